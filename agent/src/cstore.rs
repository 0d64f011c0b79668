//! DICOM transport to the PACS for `pacs.mode = "cstore"`: C-STORE SCU on one association per
//! batch (dicom-ul's client association, on a blocking thread), each instance streamed from
//! hms-edged with its File Meta removed, and C-FIND (Study Root, IMAGE level) to confirm arrival.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use dicom_ul::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason};
use hms_edge_dicom::dataset::part10_dataset_offset;
use hms_edge_dicom::dimse::{Command, field, status, tag};
use hms_edge_wire::client::InternalClient;
use http_body_util::BodyExt;

/// Study Root Query/Retrieve Information Model – FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Implicit VR Little Endian: what our C-FIND identifiers are written in.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Read/write timeout of one PDU exchange with the PACS.
pub const PDU_TIMEOUT: Duration = Duration::from_secs(60);

/// The PACS as a DICOM peer.
#[derive(Debug, Clone)]
pub struct DicomPacs {
    /// "AE@host:port"
    pub address: String,
    pub calling_ae: String,
}

/// One instance to send.
#[derive(Debug, Clone)]
pub struct ToSend {
    pub sop: String,
    pub sop_class: String,
    pub transfer_syntax: String,
}

fn options(pacs: &DicomPacs) -> ClientAssociationOptions<'static> {
    ClientAssociationOptions::new()
        .calling_ae_title(pacs.calling_ae.clone())
        .read_timeout(PDU_TIMEOUT)
        .write_timeout(PDU_TIMEOUT)
        .connection_timeout(Duration::from_secs(10))
        .max_pdu_length(128 * 1024)
}

fn read_command(
    assoc: &mut dicom_ul::ClientAssociation<std::net::TcpStream>,
) -> Result<(Command, Vec<u8>), String> {
    let mut command = Vec::new();
    let mut data = Vec::new();
    let mut command_done = false;
    loop {
        match assoc.receive().map_err(|e| e.to_string())? {
            Pdu::PData { data: values } => {
                for v in values {
                    match v.value_type {
                        PDataValueType::Command => {
                            command.extend_from_slice(&v.data);
                            command_done |= v.is_last;
                        }
                        PDataValueType::Data => {
                            data.extend_from_slice(&v.data);
                            if v.is_last {
                                return Ok((Command::decode(&command)?, data));
                            }
                        }
                    }
                }
                if command_done {
                    let cmd = Command::decode(&command)?;
                    if !cmd.has_data_set() {
                        return Ok((cmd, data));
                    }
                }
            }
            other => return Err(format!("unexpected PDU from the PACS: {other:?}")),
        }
    }
}

/// Sends `items` on one association. Per instance: `Ok(status)` (the C-STORE-RSP status) or
/// `Err(reason)`. An `Err` for the whole call means the association failed (link problem).
pub async fn store(
    pacs: &DicomPacs,
    internal: &InternalClient,
    items: Vec<ToSend>,
) -> Result<Vec<(String, Result<u16, String>)>, String> {
    let handle = tokio::runtime::Handle::current();
    let pacs = pacs.clone();
    let internal = internal.clone();
    tokio::task::spawn_blocking(move || {
        let mut opts = options(&pacs);
        let mut pairs: Vec<(String, String)> = Vec::new();
        for i in &items {
            let p = (i.sop_class.clone(), i.transfer_syntax.clone());
            if !pairs.contains(&p) {
                pairs.push(p);
            }
        }
        for (class, ts) in &pairs {
            opts = opts.with_presentation_context(class.clone(), vec![ts.clone()]);
        }
        let mut assoc = opts.establish_with(&pacs.address).map_err(|e| e.to_string())?;
        let mut results = Vec::new();
        for (n, item) in items.iter().enumerate() {
            let pc = assoc
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    pc.reason == PresentationContextResultReason::Acceptance
                        && pc.abstract_syntax.trim_end_matches('\0') == item.sop_class
                        && pc.transfer_syntax.trim_end_matches('\0') == item.transfer_syntax
                })
                .map(|pc| pc.id);
            let Some(pc) = pc else {
                results.push((
                    item.sop.clone(),
                    Err("the PACS refused this SOP class / transfer syntax".into()),
                ));
                continue;
            };
            let mut cmd = Command::new();
            cmd.set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
                .set_u16(tag::MESSAGE_ID, (n % 65000 + 1) as u16)
                .set_u16(tag::PRIORITY, 0)
                .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
                .set_uid(tag::AFFECTED_SOP_CLASS_UID, &item.sop_class)
                .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, &item.sop);
            assoc
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: pc,
                        value_type: PDataValueType::Command,
                        is_last: true,
                        data: cmd.encode(),
                    }],
                })
                .map_err(|e| e.to_string())?;
            // The data set, streamed: our File Meta is dropped, the rest goes as received.
            let resp = handle
                .block_on(internal.send(
                    hyper::Method::GET,
                    &format!("/v1/dicom/instances/{}", item.sop),
                    None,
                ))
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                let _ = assoc.abort();
                return Err(format!(
                    "hms-edged answered {} for instance {}",
                    resp.status(),
                    item.sop
                ));
            }
            let mut body = resp.into_body();
            let mut head: Vec<u8> = Vec::new();
            let mut skip: Option<usize> = None;
            {
                let mut w = assoc.send_pdata(pc);
                while let Some(frame) = handle.block_on(body.frame()) {
                    let frame = frame.map_err(|e| e.to_string())?;
                    let Ok(data) = frame.into_data() else { continue };
                    match skip {
                        Some(_) => w.write_all(&data).map_err(|e| e.to_string())?,
                        None => {
                            head.extend_from_slice(&data);
                            if head.len() >= 144 {
                                let off = part10_dataset_offset(&head).ok_or_else(|| {
                                    format!("instance {} is not a Part 10 file", item.sop)
                                })?;
                                if head.len() >= off {
                                    w.write_all(&head[off..]).map_err(|e| e.to_string())?;
                                    skip = Some(off);
                                }
                            }
                        }
                    }
                }
                if skip.is_none() {
                    return Err(format!("instance {} ended inside its File Meta", item.sop));
                }
                w.finish().map_err(|e| e.to_string())?;
            }
            let (rsp, _) = read_command(&mut assoc)?;
            let st = rsp.u16(tag::STATUS).unwrap_or(0xFFFF);
            results.push((item.sop.clone(), Ok(st)));
        }
        let _ = assoc.release();
        Ok(results)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Pads a value to even length.
fn even(mut v: Vec<u8>, pad: u8) -> Vec<u8> {
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    v
}

fn implicit(group: u16, element: u16, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Reads (0008,0018) from an Implicit VR LE identifier (flat; stops at anything it cannot walk).
fn sop_of(mut ds: &[u8]) -> Option<String> {
    while ds.len() >= 8 {
        let group = u16::from_le_bytes([ds[0], ds[1]]);
        let element = u16::from_le_bytes([ds[2], ds[3]]);
        let len = u32::from_le_bytes([ds[4], ds[5], ds[6], ds[7]]);
        if len == u32::MAX || len as usize > ds.len() - 8 {
            return None;
        }
        let value = &ds[8..8 + len as usize];
        if (group, element) == (0x0008, 0x0018) {
            return Some(String::from_utf8_lossy(value).trim_end_matches(['\0', ' ']).to_owned());
        }
        ds = &ds[8 + len as usize..];
    }
    None
}

/// SOP Instance UIDs the PACS holds for a study (C-FIND, IMAGE level).
pub async fn find_instances(pacs: &DicomPacs, study: &str) -> Result<HashSet<String>, String> {
    let pacs = pacs.clone();
    let study = study.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut assoc = options(&pacs)
            .with_presentation_context(STUDY_ROOT_FIND, vec![IMPLICIT_VR_LE])
            .establish_with(&pacs.address)
            .map_err(|e| e.to_string())?;
        let pc = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| pc.id)
            .ok_or("the PACS refused C-FIND")?;
        let mut cmd = Command::new();
        cmd.set_u16(tag::COMMAND_FIELD, field::C_FIND_RQ)
            .set_u16(tag::MESSAGE_ID, 1)
            .set_u16(tag::PRIORITY, 0)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
            .set_uid(tag::AFFECTED_SOP_CLASS_UID, STUDY_ROOT_FIND);
        let mut ident = Vec::new();
        implicit(0x0008, 0x0018, b"", &mut ident);
        implicit(0x0008, 0x0052, b"IMAGE ", &mut ident);
        implicit(0x0020, 0x000D, &even(study.into_bytes(), 0), &mut ident);
        assoc
            .send(&Pdu::PData {
                data: vec![
                    PDataValue {
                        presentation_context_id: pc,
                        value_type: PDataValueType::Command,
                        is_last: true,
                        data: cmd.encode(),
                    },
                    PDataValue {
                        presentation_context_id: pc,
                        value_type: PDataValueType::Data,
                        is_last: true,
                        data: ident,
                    },
                ],
            })
            .map_err(|e| e.to_string())?;
        let mut found = HashSet::new();
        loop {
            let (rsp, data) = read_command(&mut assoc)?;
            let st = rsp.u16(tag::STATUS).unwrap_or(0xFFFF);
            if st == status::PENDING || st == 0xFF01 {
                if let Some(sop) = sop_of(&data) {
                    found.insert(sop);
                }
                continue;
            }
            let _ = assoc.release();
            if st != status::SUCCESS {
                return Err(format!("C-FIND failed with status {st:04X}"));
            }
            return Ok(found);
        }
    })
    .await
    .map_err(|e| e.to_string())?
}
