//! The control protocol, version 1 ("Control socket, version 1" in
//! `docs/FORMATS.md`): one JSON object per line, UTF-8, each way. A request
//! is one line; each reply is one line. Both sides parse with this module.
//!
//! ```text
//! → {"v":1,"op":"tag","tag":"NAME","timeout_ms":60000}
//! ← {"v":1,"ok":true,"event":"inserted","tag":"NAME","capture_seq":N}
//! ← {"v":1,"ok":true,"event":"durable","tag":"NAME","seq":S}
//! ← {"v":1,"ok":false,"error":"CODE","message":"..."}
//! ```

use std::fmt;
use std::time::Duration;

use filter::capture::Tag;
use serde_json::{json, Map, Value};

/// The protocol version this code speaks.
pub const VERSION: u64 = 1;
/// Longest line either side accepts, newline included.
pub const MAX_LINE: usize = 4096;
/// How long a request waits for the target when it does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Insert a tagged point now; wait at most `timeout` for the target to
    /// make it durable.
    Tag { tag: Tag, timeout: Duration },
}

/// What protect answers. A `tag` request gets `Inserted` then `Durable`,
/// or an `Error` at either step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The tagged barrier is in the capture stream, after every write
    /// acknowledged before the request: a quiesced application may resume.
    /// `capture_seq` counts in this protect process's own numbering.
    Inserted {
        tag: Tag,
        capture_seq: u64,
    },
    /// The target has journaled the point: a restore point whose last
    /// sequence number (as `cdp points` shows it) is `seq`.
    Durable {
        tag: Tag,
        seq: u64,
    },
    Error(ProtocolError),
}

/// Why a request failed, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

/// The kinds of failure, as they travel (`"error": "bad_tag"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not a request of this protocol (bad JSON, unknown op, missing field,
    /// over-long line).
    BadRequest,
    /// A protocol version this side does not speak.
    Version,
    /// The tag breaks the rules.
    BadTag,
    /// A full sync is running: no restore point exists until it completes.
    FullSync,
    /// The flush or the capture failed; no point was inserted.
    Capture,
    /// The point was inserted but the target did not acknowledge it in
    /// time; it stays queued and becomes a point when the target takes it.
    Timeout,
    /// Replication stopped before the point was acknowledged.
    Replication,
    /// Protect is stopping and takes no more points.
    ShuttingDown,
}

impl ErrorCode {
    const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::Version,
        ErrorCode::BadTag,
        ErrorCode::FullSync,
        ErrorCode::Capture,
        ErrorCode::Timeout,
        ErrorCode::Replication,
        ErrorCode::ShuttingDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Version => "version",
            ErrorCode::BadTag => "bad_tag",
            ErrorCode::FullSync => "full_sync",
            ErrorCode::Capture => "capture",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Replication => "replication",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }

    fn parse(name: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Turns a `Value` into one line (no newline inside: JSON escapes them).
fn line(value: Value) -> String {
    let mut text = value.to_string();
    text.push('\n');
    text
}

/// Reads a line into a JSON object of this protocol's version.
fn object(text: &str) -> Result<Map<String, Value>, ProtocolError> {
    let bad = |message: String| ProtocolError::new(ErrorCode::BadRequest, message);
    let value: Value =
        serde_json::from_str(text.trim_end()).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("not a JSON object".into()));
    };
    match map.get("v").and_then(Value::as_u64) {
        Some(VERSION) => Ok(map),
        Some(v) => Err(ProtocolError::new(
            ErrorCode::Version,
            format!("protocol version {v} is not spoken here (this side speaks {VERSION})"),
        )),
        None => Err(bad("no protocol version \"v\"".into())),
    }
}

fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Result<&'a Value, ProtocolError> {
    map.get(name)
        .ok_or_else(|| ProtocolError::new(ErrorCode::BadRequest, format!("no {name:?}")))
}

fn text<'a>(map: &'a Map<String, Value>, name: &str) -> Result<&'a str, ProtocolError> {
    field(map, name)?.as_str().ok_or_else(|| {
        ProtocolError::new(ErrorCode::BadRequest, format!("{name:?} is not a string"))
    })
}

fn number(map: &Map<String, Value>, name: &str) -> Result<u64, ProtocolError> {
    field(map, name)?.as_u64().ok_or_else(|| {
        ProtocolError::new(
            ErrorCode::BadRequest,
            format!("{name:?} is not a whole number"),
        )
    })
}

fn tag(map: &Map<String, Value>) -> Result<Tag, ProtocolError> {
    Tag::new(text(map, "tag")?).map_err(|e| ProtocolError::new(ErrorCode::BadTag, e.to_string()))
}

impl Request {
    /// The request as a line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Tag { tag, timeout } => line(json!({
                "v": VERSION,
                "op": "tag",
                "tag": tag.as_str(),
                "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            })),
        }
    }

    /// Reads a request line; the error is what to reply.
    pub fn parse(text_line: &str) -> Result<Request, ProtocolError> {
        let map = object(text_line)?;
        match text(&map, "op")? {
            "tag" => {
                let timeout = match map.get("timeout_ms") {
                    None => DEFAULT_TIMEOUT,
                    Some(_) => Duration::from_millis(number(&map, "timeout_ms")?),
                };
                if timeout.is_zero() || timeout > MAX_TIMEOUT {
                    return Err(ProtocolError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "\"timeout_ms\" must be from 1 to {}",
                            MAX_TIMEOUT.as_millis()
                        ),
                    ));
                }
                Ok(Request::Tag {
                    tag: tag(&map)?,
                    timeout,
                })
            }
            op => Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!("unknown op {op:?} (known: \"tag\")"),
            )),
        }
    }
}

impl Reply {
    /// The reply as a line, newline included.
    pub fn to_line(&self) -> String {
        line(match self {
            Reply::Inserted { tag, capture_seq } => json!({
                "v": VERSION, "ok": true, "event": "inserted",
                "tag": tag.as_str(), "capture_seq": capture_seq,
            }),
            Reply::Durable { tag, seq } => json!({
                "v": VERSION, "ok": true, "event": "durable",
                "tag": tag.as_str(), "seq": seq,
            }),
            Reply::Error(e) => json!({
                "v": VERSION, "ok": false,
                "error": e.code.as_str(), "message": e.message,
            }),
        })
    }

    /// Reads a reply line; the error says why it is not one.
    pub fn parse(text_line: &str) -> Result<Reply, ProtocolError> {
        let map = object(text_line)?;
        let ok = field(&map, "ok")?.as_bool().ok_or_else(|| {
            ProtocolError::new(ErrorCode::BadRequest, "\"ok\" is not true or false")
        })?;
        if !ok {
            let name = text(&map, "error")?;
            let code = ErrorCode::parse(name).ok_or_else(|| {
                ProtocolError::new(ErrorCode::BadRequest, format!("unknown error {name:?}"))
            })?;
            return Ok(Reply::Error(ProtocolError::new(
                code,
                text(&map, "message")?,
            )));
        }
        match text(&map, "event")? {
            "inserted" => Ok(Reply::Inserted {
                tag: tag(&map)?,
                capture_seq: number(&map, "capture_seq")?,
            }),
            "durable" => Ok(Reply::Durable {
                tag: tag(&map)?,
                seq: number(&map, "seq")?,
            }),
            event => Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!("unknown event {event:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str) -> Tag {
        Tag::new(name).unwrap()
    }

    #[test]
    fn requests_and_replies_round_trip_as_single_lines() {
        let request = Request::Tag {
            tag: tag("vor \"dem\" Update\\ ✓"),
            timeout: Duration::from_millis(2500),
        };
        let text = request.to_line();
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with('\n'));
        assert_eq!(Request::parse(&text), Ok(request));
        for reply in [
            Reply::Inserted {
                tag: tag("t"),
                capture_seq: 7,
            },
            Reply::Durable {
                tag: tag("t"),
                seq: u64::MAX,
            },
            Reply::Error(ProtocolError::new(ErrorCode::FullSync, "line\nbreak")),
        ] {
            let text = reply.to_line();
            assert_eq!(text.matches('\n').count(), 1, "{text}");
            assert_eq!(Reply::parse(&text), Ok(reply));
        }
    }

    #[test]
    fn the_documented_request_parses_and_a_timeout_is_optional() {
        let parsed = Request::parse(r#"{"v":1,"op":"tag","tag":"nightly"}"#);
        assert_eq!(
            parsed,
            Ok(Request::Tag {
                tag: tag("nightly"),
                timeout: DEFAULT_TIMEOUT
            })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let code = |text: &str| Request::parse(text).unwrap_err().code;
        assert_eq!(code("hello"), ErrorCode::BadRequest);
        assert_eq!(code("[1]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"tag","tag":"t"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"v":2,"op":"tag","tag":"t"}"#), ErrorCode::Version);
        assert_eq!(
            code(r#"{"v":1,"op":"drop","tag":"t"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"v":1,"op":"tag"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"v":1,"op":"tag","tag":7}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"v":1,"op":"tag","tag":""}"#), ErrorCode::BadTag);
        assert_eq!(
            code(r#"{"v":1,"op":"tag","tag":"a\tb"}"#),
            ErrorCode::BadTag
        );
        let long = format!(r#"{{"v":1,"op":"tag","tag":"{}"}}"#, "x".repeat(256));
        assert_eq!(code(&long), ErrorCode::BadTag);
        assert_eq!(
            code(r#"{"v":1,"op":"tag","tag":"t","timeout_ms":0}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"v":1,"op":"tag","tag":"t","timeout_ms":-5}"#),
            ErrorCode::BadRequest
        );
        let unknown = Reply::parse(r#"{"v":1,"ok":false,"error":"nope","message":"m"}"#);
        assert_eq!(unknown.unwrap_err().code, ErrorCode::BadRequest);
    }
}
