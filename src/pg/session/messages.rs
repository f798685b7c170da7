//! The server's messages: authentication, parameters, errors, rows and
//! the end of each request.

use super::*;

impl Session {
    pub(super) fn password(&self) -> Result<&[u8], Error> {
        self.conf
            .password
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| Error::Auth("the server asks for a password and none is configured".into()))
    }

    pub(super) fn handle<N: Node>(&mut self, m: Message, now: u64, node: &mut N) -> Result<(), Error> {
        match m {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = self.password()?.to_vec();
                frontend::password_message(&pw, &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationMd5Password(b) => {
                let pw = self.password()?.to_vec();
                let h = md5_hash(self.conf.user.as_bytes(), &pw, b.salt());
                frontend::password_message(h.as_bytes(), &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationSasl(b) => {
                let mut mechs = b.mechanisms();
                let mut scram = false;
                while let Some(m) = mechs.next().map_err(proto)? {
                    scram |= m == sasl::SCRAM_SHA_256;
                }
                if !scram {
                    return Err(Error::Auth("the server offers no SASL mechanism this client supports".into()));
                }
                let pw = self.password()?.to_vec();
                let s = sasl::ScramSha256::new(&pw, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.out).map_err(proto)?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(b) => {
                let s = self.scram.as_mut().ok_or_else(|| Error::Auth("unexpected SASL message".into()))?;
                s.update(b.data()).map_err(|e| Error::Auth(format!("SCRAM: {e}")))?;
                frontend::sasl_response(s.message(), &mut self.out).map_err(proto)?;
            }
            Message::AuthenticationSaslFinal(b) => {
                let s = self.scram.as_mut().ok_or_else(|| Error::Auth("unexpected SASL message".into()))?;
                s.finish(b.data()).map_err(|e| Error::Auth(format!("SCRAM: server signature rejected: {e}")))?;
            }
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGssContinue(_) => {
                return Err(Error::Auth(
                    "the server asks for an authentication method this client does not support".into(),
                ));
            }
            Message::ParameterStatus(b) => {
                if b.name().ok() == Some("server_version")
                    && let Ok(v) = b.value()
                {
                    let bus = node.bus();
                    bus.set_text(&node.lock(), &bus.server_version, v.as_bytes());
                }
            }
            Message::ErrorResponse(b) => {
                let e = server_error(&b);
                let fatal = matches!(&e, Error::Server { severity, .. } if severity == "FATAL" || severity == "PANIC");
                if self.phase != Phase::Ready || fatal {
                    return Err(e);
                }
                self.op_err.get_or_insert(e);
            }
            Message::NotificationResponse(b) => {
                let ch = b.channel().map_err(proto)?.as_bytes().to_vec();
                let msg = b.message().map_err(proto)?.as_bytes().to_vec();
                self.notification(&ch, &msg, now, node);
            }
            Message::CommandComplete(_) | Message::EmptyQueryResponse => self.done_in_op += 1,
            Message::DataRow(b) => {
                let buf = b.buffer();
                let mut row = Vec::new();
                let mut r = b.ranges();
                while let Some(x) = r.next().map_err(proto)? {
                    row.push(x.map(|rg| buf[rg].to_vec()));
                }
                if matches!(self.ops.front(), Some(Op::Page { .. })) {
                    // Replay rows go to the ring as they come: no page is held.
                    self.replay_row(&row, node);
                    if let Some(Op::Page { last, rows }) = self.ops.front_mut() {
                        *last = (num(&row, 1), num(&row, 0));
                        *rows += 1;
                    }
                } else {
                    self.rows.push(row);
                }
            }
            Message::ReadyForQuery(_) => {
                if self.phase == Phase::Auth {
                    self.on_ready(now, node);
                } else if let Some(op) = self.ops.pop_front() {
                    let err = self.op_err.take();
                    let rows = core::mem::take(&mut self.rows);
                    let done = core::mem::take(&mut self.done_in_op);
                    self.finish(op, err, rows, done, now, node)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn on_ready<N: Node>(&mut self, now: u64, node: &mut N) {
        self.phase = Phase::Ready;
        // A new session listens to nothing: every channel again.
        let bus = node.bus();
        bus.all_wanted(&node.lock());
        self.last_rx = now;
        self.next_advance = 0;
    }
}
