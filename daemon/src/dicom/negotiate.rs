//! Association negotiation (PS3.8 7.1, PS3.7 D.3.3): who may associate, and which presentation
//! contexts we accept. A pure function of the request, the caller's address and our policy.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};

use super::uids::{
    self, APPLICATION_CONTEXT, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
    QUERY_TRANSFER_SYNTAXES, STORAGE_TRANSFER_SYNTAXES, ServiceKind,
};
use crate::config::{DicomConfig, MoveDestination};

/// Who may associate with us. Reloadable (SIGHUP) as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Our AE title; the Called AE Title must equal it.
    pub ae_title: String,
    /// Any calling AE title is accepted from a loopback address.
    pub accept_loopback: bool,
    /// Allowed calling AE titles, each with an optional required source address.
    pub peers: Vec<(String, Option<IpAddr>)>,
    /// C-MOVE destinations by AE title (the peers with an address).
    pub destinations: Vec<(String, MoveDestination)>,
    /// AE titles whose Storage Commitment reports go on a new association to their destination.
    pub commitment_new_association: HashSet<String>,
}

impl AccessPolicy {
    pub fn from_config(c: &DicomConfig) -> Self {
        AccessPolicy {
            ae_title: c.ae_title.trim().to_owned(),
            accept_loopback: c.accept_loopback_callers,
            peers: c
                .peers
                .iter()
                .map(|p| (p.ae_title.trim().to_owned(), p.address.parse().ok()))
                .collect(),
            destinations: c
                .peers
                .iter()
                .filter_map(|p| Some((p.ae_title.trim().to_owned(), p.move_destination()?)))
                .collect(),
            commitment_new_association: c
                .peers
                .iter()
                .filter(|p| p.commitment_new_association)
                .map(|p| p.ae_title.trim().to_owned())
                .collect(),
        }
    }

    /// Where C-MOVE sends to for a Move Destination AE title (the first peer entry with it).
    /// Where a Storage Commitment report for `ae_title` goes on a new association, if it asked
    /// for that (`None`: on the requester's own association).
    pub fn commitment_destination(&self, ae_title: &str) -> Option<MoveDestination> {
        self.commitment_new_association
            .contains(ae_title.trim())
            .then(|| self.destination(ae_title))
            .flatten()
    }

    pub fn destination(&self, ae_title: &str) -> Option<MoveDestination> {
        self.destinations.iter().find(|(ae, _)| ae == ae_title.trim()).map(|(_, d)| *d)
    }

    /// Whether this caller may associate.
    pub fn allows(&self, calling_ae: &str, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        (self.accept_loopback && peer.is_loopback())
            || self.peers.iter().any(|(ae, addr)| {
                ae == calling_ae.trim() && addr.is_none_or(|a| canonical(a) == peer)
            })
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
use crate::conn_gate::canonical;

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
    pub kind: ServiceKind,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone)]
pub struct Association {
    pub calling_ae: String,
    pub called_ae: String,
    /// The caller's Maximum Length (0: unlimited): our P-DATA PDUs must not exceed it.
    pub peer_max_pdu: u32,
    pub contexts: HashMap<u8, AcceptedContext>,
    /// Storage SOP classes for which the requester took the SCP role (SCP/SCU Role Selection,
    /// PS3.7 D.3.3.4): C-GET sends its C-STORE sub-operations on those contexts.
    pub requester_scp: HashSet<String>,
}

fn reject(result: AssociationRJResult, source: AssociationRJSource) -> AssociationRJ {
    AssociationRJ { result, source }
}

/// Decides on an A-ASSOCIATE-RQ: the A-ASSOCIATE-AC to send and the association, or the
/// A-ASSOCIATE-RJ with the standard reason.
pub fn negotiate(
    rq: &AssociationRQ,
    peer: IpAddr,
    policy: &AccessPolicy,
    our_max_pdu: u32,
) -> Result<(Association, AssociationAC), AssociationRJ> {
    use AssociationRJResult::Permanent;
    if rq.protocol_version & 1 == 0 {
        return Err(reject(
            Permanent,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
        ));
    }
    if uids::trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
        ));
    }
    if rq.called_ae_title.trim() != policy.ae_title {
        return Err(reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
        ));
    }
    if !policy.allows(&rq.calling_ae_title, peer) {
        return Err(reject(
            Permanent,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
        ));
    }
    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);

    let mut contexts = HashMap::new();
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    for pc in &rq.presentation_contexts {
        let abstract_syntax = uids::trim_uid(&pc.abstract_syntax);
        let kind = uids::service_kind(abstract_syntax);
        let offered: &[&str] = match kind {
            Some(ServiceKind::Storage) => STORAGE_TRANSFER_SYNTAXES,
            Some(_) => QUERY_TRANSFER_SYNTAXES,
            None => &[],
        };
        // The caller's first proposal we support: what it prefers, stored exactly as sent.
        let chosen = pc
            .transfer_syntaxes
            .iter()
            .map(|ts| uids::trim_uid(ts))
            .find(|ts| offered.contains(ts));
        let (reason, ts) = match (kind, chosen) {
            (None, _) => (PresentationContextResultReason::AbstractSyntaxNotSupported, None),
            (Some(_), None) => {
                (PresentationContextResultReason::TransferSyntaxesNotSupported, None)
            }
            (Some(kind), Some(ts)) => {
                contexts.insert(
                    pc.id,
                    AcceptedContext {
                        id: pc.id,
                        abstract_syntax: abstract_syntax.to_owned(),
                        transfer_syntax: ts.to_owned(),
                        kind,
                    },
                );
                (PresentationContextResultReason::Acceptance, Some(ts))
            }
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            // For a rejected context the field is "not significant"; send a valid UID anyway.
            transfer_syntax: ts.unwrap_or(uids::QUERY_TRANSFER_SYNTAXES[0]).to_owned(),
        });
    }
    // SCP/SCU role selection: a C-GET requester proposes the SCP role for the storage classes it
    // wants to receive. Accepted as proposed for every storage class with an accepted context.
    let mut requester_scp = HashSet::new();
    let mut role_replies = Vec::new();
    for v in &rq.user_variables {
        if let UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) = v {
            let uid = uids::trim_uid(uid);
            let accepted = contexts.values().any(|c| c.abstract_syntax == uid);
            if uids::service_kind(uid) == Some(ServiceKind::Storage) && accepted {
                if roles.scp {
                    requester_scp.insert(uid.to_owned());
                }
                role_replies.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                    uid.to_owned(),
                    RequestorRoles { scu: roles.scu, scp: roles.scp },
                ));
            }
        }
    }
    let mut user_variables = vec![
        UserVariableItem::MaxLength(our_max_pdu),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
    ];
    user_variables.extend(role_replies);
    user_variables
        .push(UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_owned()));
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: APPLICATION_CONTEXT.to_owned(),
        presentation_contexts: results,
        user_variables,
    };
    let assoc = Association {
        calling_ae: rq.calling_ae_title.trim().to_owned(),
        called_ae: rq.called_ae_title.trim().to_owned(),
        peer_max_pdu,
        contexts,
        requester_scp,
    };
    Ok((assoc, ac))
}

/// The rejection sent when every association slot is taken (transient: try again later).
pub fn busy() -> AssociationRJ {
    reject(
        AssociationRJResult::Transient,
        AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn rq(calling: &str, called: &str) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.6.1".into(),
                    transfer_syntaxes: vec![
                        "1.2.840.10008.1.2.2".into(),
                        "1.2.840.10008.1.2.4.50".into(),
                    ],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.5.1.1.9".into(), // print management
                    transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
                },
                PresentationContextProposed {
                    id: 5,
                    abstract_syntax: "1.2.840.10008.1.1\0".into(),
                    transfer_syntaxes: vec![
                        "1.2.840.10008.1.2.4.50".into(),
                        "1.2.840.10008.1.2".into(),
                    ],
                },
            ],
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn policy() -> AccessPolicy {
        AccessPolicy {
            ae_title: "HMS-EDGE".into(),
            accept_loopback: false,
            peers: vec![("CT1".into(), Some("10.0.0.5".parse().unwrap())), ("US".into(), None)],
            destinations: Vec::new(),
            commitment_new_association: HashSet::new(),
        }
    }

    #[test]
    fn accepts_known_callers_and_picks_contexts() {
        let (a, ac) =
            negotiate(&rq("CT1", "HMS-EDGE"), "10.0.0.5".parse().unwrap(), &policy(), 65536)
                .unwrap();
        assert_eq!(a.peer_max_pdu, 16384);
        assert_eq!(a.contexts[&1].transfer_syntax, "1.2.840.10008.1.2.4.50");
        assert_eq!(a.contexts[&5].transfer_syntax, "1.2.840.10008.1.2");
        assert!(!a.contexts.contains_key(&3));
        assert_eq!(
            ac.presentation_contexts[1].reason,
            PresentationContextResultReason::AbstractSyntaxNotSupported
        );
        assert!(
            negotiate(&rq("US", "HMS-EDGE"), "192.0.2.1".parse().unwrap(), &policy(), 65536)
                .is_ok()
        );
    }

    #[test]
    fn accepts_the_scp_role_for_storage_classes_a_getscu_proposes() {
        let mut r = rq("CT1", "HMS-EDGE");
        r.user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
            "1.2.840.10008.5.1.4.1.1.6.1".into(),
            RequestorRoles { scu: false, scp: true },
        ));
        // Not a storage class, and a storage class without a context: no reply.
        for uid in ["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"] {
            r.user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                uid.into(),
                RequestorRoles { scu: true, scp: true },
            ));
        }
        let (a, ac) = negotiate(&r, "10.0.0.5".parse().unwrap(), &policy(), 65536).unwrap();
        assert_eq!(a.requester_scp, HashSet::from(["1.2.840.10008.5.1.4.1.1.6.1".to_owned()]));
        let replies: Vec<_> = ac
            .user_variables
            .iter()
            .filter(|v| matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(..)))
            .collect();
        assert_eq!(
            replies,
            [&UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.6.1".into(),
                RequestorRoles { scu: false, scp: true }
            )]
        );
        // The reply survives the codec (a getscu reads it back).
        let bytes = super::super::pdu::encode(&dicom_ul::pdu::Pdu::AssociationAC(ac.clone()));
        let back = dicom_ul::pdu::read_pdu(&mut &bytes[..], 1 << 20, true).unwrap().unwrap();
        assert_eq!(back, dicom_ul::pdu::Pdu::AssociationAC(ac));
    }

    #[test]
    fn move_destinations_come_from_the_peers_with_an_address() {
        let c: DicomConfig = crate::config::parse(
            "[dicom]\npeers = [{ ae_title = \"VIEW\", address = \"10.0.0.8\", port = 4006 },\n\
             { ae_title = \"US\" }]\n",
            "",
            Vec::new(),
        )
        .unwrap()
        .dicom;
        let p = AccessPolicy::from_config(&c);
        assert_eq!(p.destination("VIEW ").unwrap().addr, "10.0.0.8:4006".parse().unwrap());
        assert!(p.destination("US").is_none());
        assert!(p.destination("NOBODY").is_none());
    }

    #[test]
    fn rejects_with_standard_reasons() {
        let reason = |calling: &str, called: &str, ip: &str| {
            negotiate(&rq(calling, called), ip.parse().unwrap(), &policy(), 65536)
                .unwrap_err()
                .source
        };
        assert_eq!(
            reason("CT1", "HMS-EDGE", "10.0.0.6"),
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized
            )
        );
        assert_eq!(
            reason("EVIL", "HMS-EDGE", "127.0.0.1"),
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized
            )
        );
        assert_eq!(
            reason("CT1", "OTHER", "10.0.0.5"),
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
        let mut p = policy();
        p.accept_loopback = true;
        assert!(
            negotiate(&rq("ANY", "HMS-EDGE"), "::ffff:127.0.0.1".parse().unwrap(), &p, 65536)
                .is_ok()
        );
    }
}
