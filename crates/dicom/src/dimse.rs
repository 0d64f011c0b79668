//! DIMSE command sets (PS3.7 section 9 and Annex E): group 0000 elements, always Implicit VR
//! Little Endian. Commands are small and flat, so they are decoded and encoded here directly.

use std::collections::BTreeMap;

/// Largest command set we accept (real ones are a few hundred bytes).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Command Field values (PS3.7 E.1).
pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    pub const N_ACTION_RQ: u16 = 0x0130;
    pub const N_ACTION_RSP: u16 = 0x8130;
}

/// Command element numbers (group 0000).
pub mod tag {
    pub const GROUP_LENGTH: u16 = 0x0000;
    pub const AFFECTED_SOP_CLASS_UID: u16 = 0x0002;
    pub const REQUESTED_SOP_CLASS_UID: u16 = 0x0003;
    pub const COMMAND_FIELD: u16 = 0x0100;
    pub const MESSAGE_ID: u16 = 0x0110;
    pub const MESSAGE_ID_BEING_RESPONDED_TO: u16 = 0x0120;
    pub const MOVE_DESTINATION: u16 = 0x0600;
    pub const PRIORITY: u16 = 0x0700;
    pub const COMMAND_DATA_SET_TYPE: u16 = 0x0800;
    pub const STATUS: u16 = 0x0900;
    pub const ERROR_COMMENT: u16 = 0x0902;
    pub const AFFECTED_SOP_INSTANCE_UID: u16 = 0x1000;
    pub const REQUESTED_SOP_INSTANCE_UID: u16 = 0x1001;
    pub const EVENT_TYPE_ID: u16 = 0x1002;
    pub const ACTION_TYPE_ID: u16 = 0x1008;
    pub const NUMBER_OF_REMAINING_SUBOPERATIONS: u16 = 0x1020;
    pub const NUMBER_OF_COMPLETED_SUBOPERATIONS: u16 = 0x1021;
    pub const NUMBER_OF_FAILED_SUBOPERATIONS: u16 = 0x1022;
    pub const NUMBER_OF_WARNING_SUBOPERATIONS: u16 = 0x1023;
    pub const MOVE_ORIGINATOR_AE_TITLE: u16 = 0x1030;
    pub const MOVE_ORIGINATOR_MESSAGE_ID: u16 = 0x1031;
}

/// Status codes we send (PS3.7 Annex C and PS3.4 B.2.3 / C.4.1.1.4).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const PENDING: u16 = 0xFF00;
    pub const CANCEL: u16 = 0xFE00;
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    pub const NO_SUCH_SOP_INSTANCE: u16 = 0x0112;
    pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
    pub const MISSING_ATTRIBUTE: u16 = 0x0120;
    pub const NO_SUCH_ACTION_TYPE: u16 = 0x0123;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// C-GET/C-MOVE: unable to calculate the number of matches.
    pub const UNABLE_TO_CALCULATE_MATCHES: u16 = 0xA701;
    /// C-GET/C-MOVE: unable to perform the sub-operations.
    pub const UNABLE_TO_PERFORM_SUBOPERATIONS: u16 = 0xA702;
    /// C-MOVE: Move Destination unknown.
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    /// C-GET/C-MOVE: sub-operations complete, one or more failures or warnings.
    pub const SUBOPERATIONS_WARNING: u16 = 0xB000;
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    pub const UNABLE_TO_PROCESS: u16 = 0xC001;
}

/// "No data set follows" value of Command Data Set Type.
pub const NO_DATA_SET: u16 = 0x0101;

/// A decoded command set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    elements: BTreeMap<u16, Vec<u8>>,
}

impl Command {
    /// Decodes an Implicit VR Little Endian command set; only group 0000 is allowed.
    pub fn decode(mut bytes: &[u8]) -> Result<Command, String> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err("command set too large".into());
        }
        let mut elements = BTreeMap::new();
        while !bytes.is_empty() {
            if bytes.len() < 8 {
                return Err("command set ends inside an element header".into());
            }
            let group = u16::from_le_bytes([bytes[0], bytes[1]]);
            let element = u16::from_le_bytes([bytes[2], bytes[3]]);
            let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
            if group != 0 {
                return Err(format!("element ({group:04X},{element:04X}) outside group 0000"));
            }
            if len > bytes.len() - 8 {
                return Err(format!("element (0000,{element:04X}) runs past the command set"));
            }
            elements.insert(element, bytes[8..8 + len].to_vec());
            bytes = &bytes[8 + len..];
        }
        let cmd = Command { elements };
        if cmd.u16(tag::COMMAND_FIELD).is_none() {
            return Err("command set without a valid Command Field".into());
        }
        Ok(cmd)
    }

    pub fn new() -> Self {
        Self::default()
    }

    pub fn u16(&self, element: u16) -> Option<u16> {
        match self.elements.get(&element)?.as_slice() {
            [a, b] => Some(u16::from_le_bytes([*a, *b])),
            _ => None,
        }
    }

    /// A string value without its padding.
    pub fn str(&self, element: u16) -> Option<&str> {
        let v = self.elements.get(&element)?;
        std::str::from_utf8(v).ok().map(|s| s.trim_end_matches(['\0', ' ']).trim_start())
    }

    pub fn command_field(&self) -> u16 {
        self.u16(tag::COMMAND_FIELD).unwrap_or(0)
    }

    pub fn message_id(&self) -> u16 {
        self.u16(tag::MESSAGE_ID).unwrap_or(0)
    }

    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.u16(tag::COMMAND_DATA_SET_TYPE).is_some_and(|v| v != NO_DATA_SET)
    }

    pub fn set_u16(&mut self, element: u16, v: u16) -> &mut Self {
        self.elements.insert(element, v.to_le_bytes().to_vec());
        self
    }

    /// Sets a UI value (padded with NUL to even length).
    pub fn set_uid(&mut self, element: u16, v: &str) -> &mut Self {
        let mut b = v.as_bytes().to_vec();
        if b.len() % 2 == 1 {
            b.push(0);
        }
        self.elements.insert(element, b);
        self
    }

    /// Sets an AE value (padded with a space to even length, at most 16 characters).
    pub fn set_ae(&mut self, element: u16, v: &str) -> &mut Self {
        let mut b: Vec<u8> = v.trim().bytes().take(16).collect();
        if b.len() % 2 == 1 {
            b.push(b' ');
        }
        self.elements.insert(element, b);
        self
    }

    /// Sets a text value (padded with a space to even length), at most 64 characters (LO).
    pub fn set_text(&mut self, element: u16, v: &str) -> &mut Self {
        let mut b: Vec<u8> =
            v.bytes().filter(|c| (0x20..0x7f).contains(c) && *c != b'\\').take(64).collect();
        if b.len() % 2 == 1 {
            b.push(b' ');
        }
        self.elements.insert(element, b);
        self
    }

    /// Encodes with a correct Command Group Length first.
    pub fn encode(&self) -> Vec<u8> {
        let body_len: usize =
            self.elements.iter().filter(|(e, _)| **e != 0).map(|(_, v)| 8 + v.len()).sum();
        let mut out = Vec::with_capacity(12 + body_len);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        for (element, value) in self.elements.iter().filter(|(e, _)| **e != 0) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    /// The response to a request: same SOP class/instance, Message ID Being Responded To.
    pub fn response_to(rq: &Command, field: u16, status: u16, has_data: bool) -> Command {
        let mut rsp = Command::new();
        rsp.set_u16(tag::COMMAND_FIELD, field)
            .set_u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, rq.message_id())
            .set_u16(tag::COMMAND_DATA_SET_TYPE, if has_data { 0x0000 } else { NO_DATA_SET })
            .set_u16(tag::STATUS, status);
        if let Some(c) = rq.str(tag::AFFECTED_SOP_CLASS_UID) {
            rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, c);
        }
        if let Some(i) = rq.str(tag::AFFECTED_SOP_INSTANCE_UID) {
            rsp.set_uid(tag::AFFECTED_SOP_INSTANCE_UID, i);
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_group_length() {
        let mut c = Command::new();
        c.set_u16(tag::COMMAND_FIELD, field::C_ECHO_RQ)
            .set_u16(tag::MESSAGE_ID, 7)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .set_uid(tag::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.1.1");
        let bytes = c.encode();
        let group_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(group_len, bytes.len() - 12);
        let d = Command::decode(&bytes).unwrap();
        assert_eq!(d.command_field(), field::C_ECHO_RQ);
        assert_eq!(d.message_id(), 7);
        assert!(!d.has_data_set());
        assert_eq!(d.str(tag::AFFECTED_SOP_CLASS_UID), Some("1.2.840.10008.1.1"));
        let rsp = Command::response_to(&d, field::C_ECHO_RSP, status::SUCCESS, false);
        assert_eq!(rsp.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
    }

    #[test]
    fn refuses_garbage() {
        assert!(Command::decode(&[0, 0, 0, 1, 2]).is_err());
        assert!(Command::decode(&[8, 0, 0x10, 0, 2, 0, 0, 0, 1, 2]).is_err());
        assert!(Command::decode(&[0, 0, 0, 1, 9, 0, 0, 0, 1, 2]).is_err());
        assert!(Command::decode(&[0, 0, 0x10, 0, 2, 0, 0, 0, 1, 2]).is_err()); // no command field
    }
}
