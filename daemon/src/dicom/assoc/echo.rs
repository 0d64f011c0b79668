//! Verification SCP (C-ECHO).

use dicom_ul::pdu::AbortRQServiceProviderReason as AbortReason;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use super::message::Message;
use crate::dicom::dimse::{Command, field, status};
use crate::dicom::negotiate::AcceptedContext;
use crate::dicom::uids::ServiceKind;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A C-ECHO-RQ: success on a Verification context.
    pub(super) async fn on_echo(
        &mut self,
        pc: AcceptedContext,
        cmd: Command,
    ) -> Result<(), AbortReason> {
        let st = if pc.kind == ServiceKind::Verification {
            status::SUCCESS
        } else {
            status::SOP_CLASS_NOT_SUPPORTED
        };
        if cmd.has_data_set() {
            self.state =
                Message::discard(pc, cmd, status::CANNOT_UNDERSTAND, "C-ECHO with a data set");
            return Ok(());
        }
        metrics::counter!("hms_dicom_echo_total").increment(1);
        self.respond(&pc, &cmd, field::C_ECHO_RSP, st, "").await
    }
}
