//! Tags: the names of application-consistent (tagged) restore points. This
//! module owns what a valid name is, so the capture stream, the capture log,
//! the batch payload, the journal and the control socket all accept exactly
//! the same names.

use std::fmt;
use std::str::FromStr;

/// Longest tag in bytes: every format stores a tag behind a one-byte length.
pub const MAX_TAG_LEN: usize = 255;

/// A valid tag: 1 to [`MAX_TAG_LEN`] bytes of UTF-8 with no control
/// characters (so it fits on one line of a table or of the control
/// protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

/// Why a name is not a valid tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("a tag must not be empty")]
    Empty,
    #[error("a tag is at most {MAX_TAG_LEN} bytes; this one has {0}")]
    TooLong(usize),
    #[error("a tag must be UTF-8; byte {0} is not")]
    NotUtf8(usize),
    #[error("a tag must not contain control characters ({0:?} at byte {1})")]
    Control(char, usize),
}

impl Tag {
    /// Checks `name` against the rules.
    pub fn new(name: &str) -> Result<Tag, TagError> {
        if name.is_empty() {
            return Err(TagError::Empty);
        }
        if name.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong(name.len()));
        }
        if let Some((at, c)) = name.char_indices().find(|(_, c)| c.is_control()) {
            return Err(TagError::Control(c, at));
        }
        Ok(Tag(name.into()))
    }

    /// A tag as stored: its UTF-8 bytes, checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Tag, TagError> {
        if bytes.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong(bytes.len()));
        }
        let name = std::str::from_utf8(bytes).map_err(|e| TagError::NotUtf8(e.valid_up_to()))?;
        Tag::new(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length in bytes, 1 to [`MAX_TAG_LEN`], as the formats store it.
    pub fn len_byte(&self) -> u8 {
        u8::try_from(self.0.len()).expect("a tag is at most 255 bytes")
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tag {
    type Err = TagError;

    fn from_str(name: &str) -> Result<Tag, TagError> {
        Tag::new(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            Tag::new("before-upgrade").unwrap().as_str(),
            "before-upgrade"
        );
        assert_eq!(Tag::new("nächtlich 03:00").unwrap().len_byte(), 16);
        assert!(Tag::new(&"x".repeat(MAX_TAG_LEN)).is_ok());
        assert_eq!(Tag::new(""), Err(TagError::Empty));
        assert_eq!(Tag::new(&"x".repeat(256)), Err(TagError::TooLong(256)));
        assert_eq!(Tag::new("a\nb"), Err(TagError::Control('\n', 1)));
        assert_eq!(Tag::new("\u{7f}"), Err(TagError::Control('\u{7f}', 0)));
        assert_eq!(Tag::from_bytes(b"ok").unwrap().as_str(), "ok");
        assert_eq!(Tag::from_bytes(b"ab\xff"), Err(TagError::NotUtf8(2)));
        assert_eq!(Tag::from_bytes(&[b'y'; 300]), Err(TagError::TooLong(300)));
    }
}
