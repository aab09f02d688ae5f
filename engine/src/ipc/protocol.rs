//! Records between clients and the engine: commands in the `commands` ring (many clients, one
//! engine), responses and events in the `responses` log (one engine, every client).
//!
//! Every record is little-endian: fixed fields, then (where there is one) a UTF-8 string that
//! fills the rest of the record. Decoding is for untrusted bytes: anything short, oversized or
//! not UTF-8 is a [`Malformed`] error.

/// A record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} record")]
pub struct Malformed(pub &'static str);

/// Longest group name.
pub const MAX_GROUP_NAME: usize = 64;

/// Command type ids.
pub mod command {
    /// `client, correlation, stream: u32, group name`.
    pub const ADD_PUBLICATION: u32 = 1;
    /// `client, correlation, id`.
    pub const REMOVE_PUBLICATION: u32 = 2;
    /// `client, correlation, stream: u32, order: u32, group name`.
    pub const ADD_SUBSCRIPTION: u32 = 3;
    /// `client, correlation, id`.
    pub const REMOVE_SUBSCRIPTION: u32 = 4;
}

/// Response type ids.
pub mod response {
    /// `correlation, id, group: u32, stream: u32, max message: u64, sender: u32, 0: u32, path`.
    pub const PUBLICATION_READY: u32 = 1;
    /// `correlation, id, group: u32, stream: u32, path`.
    pub const SUBSCRIPTION_READY: u32 = 2;
    /// `0, session, group: u32, stream: u32, sender: u32, 0: u32, path` (correlation unused).
    pub const IMAGE_AVAILABLE: u32 = 3;
    /// `0, session, group: u32, stream: u32`.
    pub const IMAGE_UNAVAILABLE: u32 = 4;
    /// `correlation, code: u32, 0: u32, message`.
    pub const ERROR: u32 = 5;
    /// `correlation`: a remove was done.
    pub const DONE: u32 = 6;
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A publication of `group` on `stream`.
    AddPublication {
        /// Asking client.
        client: u64,
        /// Echoed in the response.
        correlation: u64,
        /// Stream number.
        stream: u32,
        /// Group name.
        group: String,
    },
    /// Close publication `id`.
    RemovePublication {
        /// Asking client.
        client: u64,
        /// Echoed in the response.
        correlation: u64,
        /// The publication.
        id: u64,
    },
    /// A subscription to `group` on `stream`.
    AddSubscription {
        /// Asking client.
        client: u64,
        /// Echoed in the response.
        correlation: u64,
        /// Stream number.
        stream: u32,
        /// Ordering code (0 = FIFO).
        order: u32,
        /// Group name.
        group: String,
    },
    /// Close subscription `id`.
    RemoveSubscription {
        /// Asking client.
        client: u64,
        /// Echoed in the response.
        correlation: u64,
        /// The subscription.
        id: u64,
    },
}

/// A decoded response or event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A publication was made: write into the log at `path`.
    PublicationReady {
        /// The request's correlation.
        correlation: u64,
        /// Publication (and image session) id.
        id: u64,
        /// Group id.
        group: u32,
        /// Stream.
        stream: u32,
        /// Largest message.
        max_message: u64,
        /// The engine's member id in the group.
        sender: u32,
        /// The log.
        path: String,
    },
    /// A subscription was made: remote deliveries arrive in the log at `path`.
    SubscriptionReady {
        /// The request's correlation.
        correlation: u64,
        /// Subscription id.
        id: u64,
        /// Group id.
        group: u32,
        /// Stream.
        stream: u32,
        /// The log of remote deliveries.
        path: String,
    },
    /// A local publication that subscriptions of `group`/`stream` read directly.
    ImageAvailable {
        /// The publication's id.
        session: u64,
        /// Group id.
        group: u32,
        /// Stream.
        stream: u32,
        /// The engine's member id in the group.
        sender: u32,
        /// The publication's log.
        path: String,
    },
    /// That publication closed: read what is left, then let go.
    ImageUnavailable {
        /// The publication's id.
        session: u64,
        /// Group id.
        group: u32,
        /// Stream.
        stream: u32,
    },
    /// A request failed.
    Error {
        /// The request's correlation.
        correlation: u64,
        /// Error code (see `ipc::ErrorCode`).
        code: u32,
        /// What went wrong.
        message: String,
    },
    /// A remove was done.
    Done {
        /// The request's correlation.
        correlation: u64,
    },
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed(self.what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| Malformed(self.what))?,
        ))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(
            b.try_into().map_err(|_| Malformed(self.what))?,
        ))
    }

    /// The rest as a string of at most `max` bytes.
    fn rest(&mut self, max: usize) -> Result<String, Malformed> {
        let b = std::mem::take(&mut self.bytes);
        if b.len() > max {
            return Err(Malformed(self.what));
        }
        String::from_utf8(b.to_vec()).map_err(|_| Malformed(self.what))
    }

    fn end(&self) -> Result<(), Malformed> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Malformed(self.what))
        }
    }
}

/// Longest path or message string in a response.
const MAX_TEXT: usize = 4096;

impl Command {
    /// `(type id, bytes)` of this command.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let mut out = Vec::with_capacity(32);
        let t = match self {
            Command::AddPublication {
                client,
                correlation,
                stream,
                group,
            } => {
                put_u64(&mut out, *client);
                put_u64(&mut out, *correlation);
                put_u32(&mut out, *stream);
                out.extend_from_slice(group.as_bytes());
                command::ADD_PUBLICATION
            }
            Command::AddSubscription {
                client,
                correlation,
                stream,
                order,
                group,
            } => {
                put_u64(&mut out, *client);
                put_u64(&mut out, *correlation);
                put_u32(&mut out, *stream);
                put_u32(&mut out, *order);
                out.extend_from_slice(group.as_bytes());
                command::ADD_SUBSCRIPTION
            }
            Command::RemovePublication {
                client,
                correlation,
                id,
            }
            | Command::RemoveSubscription {
                client,
                correlation,
                id,
            } => {
                put_u64(&mut out, *client);
                put_u64(&mut out, *correlation);
                put_u64(&mut out, *id);
                if matches!(self, Command::RemovePublication { .. }) {
                    command::REMOVE_PUBLICATION
                } else {
                    command::REMOVE_SUBSCRIPTION
                }
            }
        };
        (t, out)
    }

    /// Decodes a command record.
    pub fn decode(type_id: u32, bytes: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor {
            bytes,
            what: "command",
        };
        let client = c.u64()?;
        let correlation = c.u64()?;
        let cmd = match type_id {
            command::ADD_PUBLICATION => {
                let stream = c.u32()?;
                let group = c.rest(MAX_GROUP_NAME)?;
                Command::AddPublication {
                    client,
                    correlation,
                    stream,
                    group,
                }
            }
            command::ADD_SUBSCRIPTION => {
                let stream = c.u32()?;
                let order = c.u32()?;
                let group = c.rest(MAX_GROUP_NAME)?;
                Command::AddSubscription {
                    client,
                    correlation,
                    stream,
                    order,
                    group,
                }
            }
            command::REMOVE_PUBLICATION => Command::RemovePublication {
                client,
                correlation,
                id: c.u64()?,
            },
            command::REMOVE_SUBSCRIPTION => Command::RemoveSubscription {
                client,
                correlation,
                id: c.u64()?,
            },
            _ => return Err(Malformed("command")),
        };
        c.end()?;
        Ok(cmd)
    }

    /// The client that sent it.
    pub fn client(&self) -> u64 {
        match self {
            Command::AddPublication { client, .. }
            | Command::RemovePublication { client, .. }
            | Command::AddSubscription { client, .. }
            | Command::RemoveSubscription { client, .. } => *client,
        }
    }

    /// Its correlation id.
    pub fn correlation(&self) -> u64 {
        match self {
            Command::AddPublication { correlation, .. }
            | Command::RemovePublication { correlation, .. }
            | Command::AddSubscription { correlation, .. }
            | Command::RemoveSubscription { correlation, .. } => *correlation,
        }
    }
}

impl Response {
    /// `(type id, bytes)` of this response.
    pub fn encode(&self) -> (u32, Vec<u8>) {
        let mut out = Vec::with_capacity(64);
        let t = match self {
            Response::PublicationReady {
                correlation,
                id,
                group,
                stream,
                max_message,
                sender,
                path,
            } => {
                put_u64(&mut out, *correlation);
                put_u64(&mut out, *id);
                put_u32(&mut out, *group);
                put_u32(&mut out, *stream);
                put_u64(&mut out, *max_message);
                put_u32(&mut out, *sender);
                put_u32(&mut out, 0);
                out.extend_from_slice(path.as_bytes());
                response::PUBLICATION_READY
            }
            Response::SubscriptionReady {
                correlation,
                id,
                group,
                stream,
                path,
            } => {
                put_u64(&mut out, *correlation);
                put_u64(&mut out, *id);
                put_u32(&mut out, *group);
                put_u32(&mut out, *stream);
                out.extend_from_slice(path.as_bytes());
                response::SUBSCRIPTION_READY
            }
            Response::ImageAvailable {
                session,
                group,
                stream,
                sender,
                path,
            } => {
                put_u64(&mut out, 0);
                put_u64(&mut out, *session);
                put_u32(&mut out, *group);
                put_u32(&mut out, *stream);
                put_u32(&mut out, *sender);
                put_u32(&mut out, 0);
                out.extend_from_slice(path.as_bytes());
                response::IMAGE_AVAILABLE
            }
            Response::ImageUnavailable {
                session,
                group,
                stream,
            } => {
                put_u64(&mut out, 0);
                put_u64(&mut out, *session);
                put_u32(&mut out, *group);
                put_u32(&mut out, *stream);
                response::IMAGE_UNAVAILABLE
            }
            Response::Error {
                correlation,
                code,
                message,
            } => {
                put_u64(&mut out, *correlation);
                put_u32(&mut out, *code);
                put_u32(&mut out, 0);
                let m = message.as_bytes();
                let mut n = m.len().min(MAX_TEXT);
                while !message.is_char_boundary(n) {
                    n -= 1;
                }
                out.extend_from_slice(&m[..n]);
                response::ERROR
            }
            Response::Done { correlation } => {
                put_u64(&mut out, *correlation);
                response::DONE
            }
        };
        (t, out)
    }

    /// Decodes a response record.
    pub fn decode(type_id: u32, bytes: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor {
            bytes,
            what: "response",
        };
        let correlation = c.u64()?;
        let r = match type_id {
            response::PUBLICATION_READY => {
                let id = c.u64()?;
                let group = c.u32()?;
                let stream = c.u32()?;
                let max_message = c.u64()?;
                let sender = c.u32()?;
                c.u32()?;
                Response::PublicationReady {
                    correlation,
                    id,
                    group,
                    stream,
                    max_message,
                    sender,
                    path: c.rest(MAX_TEXT)?,
                }
            }
            response::SUBSCRIPTION_READY => Response::SubscriptionReady {
                correlation,
                id: c.u64()?,
                group: c.u32()?,
                stream: c.u32()?,
                path: c.rest(MAX_TEXT)?,
            },
            response::IMAGE_AVAILABLE => {
                let session = c.u64()?;
                let group = c.u32()?;
                let stream = c.u32()?;
                let sender = c.u32()?;
                c.u32()?;
                Response::ImageAvailable {
                    session,
                    group,
                    stream,
                    sender,
                    path: c.rest(MAX_TEXT)?,
                }
            }
            response::IMAGE_UNAVAILABLE => Response::ImageUnavailable {
                session: c.u64()?,
                group: c.u32()?,
                stream: c.u32()?,
            },
            response::ERROR => {
                let code = c.u32()?;
                c.u32()?;
                Response::Error {
                    correlation,
                    code,
                    message: c.rest(MAX_TEXT)?,
                }
            }
            response::DONE => Response::Done { correlation },
            _ => return Err(Malformed("response")),
        };
        c.end()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_record_round_trips() {
        let commands = [
            Command::AddPublication {
                client: 1,
                correlation: 2,
                stream: 3,
                group: "demo".into(),
            },
            Command::RemovePublication {
                client: 1,
                correlation: 2,
                id: 9,
            },
            Command::AddSubscription {
                client: 1,
                correlation: 2,
                stream: 3,
                order: 0,
                group: "g".into(),
            },
            Command::RemoveSubscription {
                client: 1,
                correlation: 2,
                id: 9,
            },
        ];
        for c in commands {
            let (t, b) = c.encode();
            assert_eq!(Command::decode(t, &b).unwrap(), c);
        }
        let responses = [
            Response::PublicationReady {
                correlation: 1,
                id: 2,
                group: 3,
                stream: 4,
                max_message: 5,
                sender: 6,
                path: "/dev/shm/x".into(),
            },
            Response::SubscriptionReady {
                correlation: 1,
                id: 2,
                group: 3,
                stream: 4,
                path: "p".into(),
            },
            Response::ImageAvailable {
                session: 1,
                group: 2,
                stream: 3,
                sender: 4,
                path: "q".into(),
            },
            Response::ImageUnavailable {
                session: 1,
                group: 2,
                stream: 3,
            },
            Response::Error {
                correlation: 1,
                code: 2,
                message: "bad".into(),
            },
            Response::Done { correlation: 7 },
        ];
        for r in responses {
            let (t, b) = r.encode();
            assert_eq!(Response::decode(t, &b).unwrap(), r);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Random bytes of any type id decode to a record or a typed error, never a panic.
        #[test]
        fn random_records_never_panic(t in 0u32..10, bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Command::decode(t, &bytes);
            let _ = Response::decode(t, &bytes);
        }
    }
}
