//! What identifies one version of a remote object, and how a cache layer records it.
//!
//! A cache layer records its remote parent as the parent hint every layer has (the ASIF
//! metadata's parent path, the qcow2 backing file name): the object's URL, followed by a
//! fragment holding the identity, `URL#size=N&etag=E&last-modified=L&sha256=H` (values
//! percent-encoded; fields other than `size` optional). A fragment is never sent to a server,
//! so the URL stays usable as it is, and the identity travels with the layer file wherever it
//! is copied.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::error::{Error, ErrorKind, Result};

/// Characters escaped in fragment values: everything that is not plain visible ASCII or that
/// separates fields.
const VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'=')
    .add(b'<')
    .add(b'>')
    .add(b'`');

/// The longest identity value accepted (an ETag or a date is far shorter).
const MAX_VALUE: usize = 512;

/// One version of a remote object: its size plus whatever validators the server gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The object's length in bytes.
    pub size: u64,
    /// The `ETag` header as sent (quotes included; `W/` for a weak one).
    pub etag: Option<String>,
    /// The `Last-Modified` header as sent.
    pub last_modified: Option<String>,
    /// The SHA-256 of the object's bytes (lower-case hex), when the user gave one; checked
    /// when the cache layer is made.
    pub sha256: Option<String>,
}

impl Identity {
    /// Whether a strong ETag or a Last-Modified date pins the version (a weak ETag does not).
    pub fn has_validator(&self) -> bool {
        self.strong_etag().is_some() || self.last_modified.is_some()
    }

    /// The ETag, if it is a strong one.
    pub fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| !e.starts_with("W/"))
    }

    /// The value for `If-Range`/`If-Match`-style checks: a strong ETag, else Last-Modified.
    pub(crate) fn validator(&self) -> Option<&str> {
        self.strong_etag().or(self.last_modified.as_deref())
    }

    /// The fragment recording this identity (without the `#`).
    pub fn to_fragment(&self) -> String {
        let mut out = format!("size={}", self.size);
        let mut put = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                out.push('&');
                out.push_str(name);
                out.push('=');
                out.extend(utf8_percent_encode(v, VALUE));
            }
        };
        put("etag", &self.etag);
        put("last-modified", &self.last_modified);
        put("sha256", &self.sha256);
        out
    }

    /// Parse a fragment written by [`Identity::to_fragment`]. Unknown fields are refused, so
    /// that a check added later is never silently skipped by an older version.
    pub fn parse_fragment(fragment: &str) -> Result<Identity> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("the remote parent's recorded identity '#{fragment}' is invalid: {why}"),
            )
        };
        let mut id = Identity::default();
        let mut size = None;
        for field in fragment.split('&') {
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| bad(format!("'{field}' is not NAME=VALUE")))?;
            let value = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| bad(format!("'{name}' is not UTF-8")))?
                .into_owned();
            if value.len() > MAX_VALUE || value.chars().any(|c| c.is_control()) {
                return Err(bad(format!("'{name}' is too long or has control characters")));
            }
            let slot = match name {
                "size" => {
                    let n = value.parse::<u64>().map_err(|_| bad("bad size".into()))?;
                    if size.replace(n).is_some() {
                        return Err(bad("'size' given twice".into()));
                    }
                    continue;
                }
                "etag" => &mut id.etag,
                "last-modified" => &mut id.last_modified,
                "sha256" => {
                    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad("sha256 is not 64 hex digits".into()));
                    }
                    &mut id.sha256
                }
                other => return Err(bad(format!("unknown field '{other}'"))),
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("'{name}' given twice")));
            }
        }
        id.size = size.ok_or_else(|| bad("no size".into()))?;
        Ok(id)
    }

    /// Check that `now` (just read from the server) is the version this identity recorded:
    /// the same size, and the same strong ETag (or, without one, the same Last-Modified).
    pub fn check(&self, now: &Identity, url: &str) -> Result<()> {
        let same = self.size == now.size
            && match (self.strong_etag(), now.strong_etag()) {
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
                (None, _) => match (&self.last_modified, &now.last_modified) {
                    (Some(a), Some(b)) => a == b,
                    (Some(_), None) => false,
                    (None, _) => true,
                },
            };
        if same {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Changed,
            format!(
                "{url} is no longer the object the cache layer was made from (recorded {}; now {}): \
                 its cached blocks cannot be mixed with the new content; make a new cache layer",
                self.describe(),
                now.describe()
            ),
        ))
    }

    /// A short description for messages.
    pub fn describe(&self) -> String {
        let mut s = format!("{} bytes", self.size);
        if let Some(e) = &self.etag {
            s.push_str(&format!(", ETag {e}"));
        }
        if let Some(l) = &self.last_modified {
            s.push_str(&format!(", Last-Modified {l}"));
        }
        s
    }
}

/// A parent hint naming a remote object: its URL and recorded identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHint {
    /// The URL, without the fragment.
    pub url: String,
    /// The recorded identity.
    pub identity: Identity,
}

impl RemoteHint {
    /// The hint to record in a cache layer.
    pub fn to_hint(&self) -> String {
        format!("{}#{}", self.url, self.identity.to_fragment())
    }

    /// Parse a recorded hint; `Ok(None)` when the hint is not a remote URL at all.
    pub fn parse(hint: &str) -> Result<Option<RemoteHint>> {
        if !is_remote(hint) {
            return Ok(None);
        }
        let Some((url, fragment)) = hint.split_once('#') else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "the layer names the remote parent {hint} without recording which version of it \
                     it caches; such a layer is never followed"
                ),
            ));
        };
        Ok(Some(RemoteHint {
            url: url.to_string(),
            identity: Identity::parse_fragment(fragment)?,
        }))
    }
}

/// Whether `name` is a URL of a kind remote storage opens (`http://`, `https://`, `s3://`).
pub fn is_remote(name: &str) -> bool {
    let lower = name.get(..8).unwrap_or(name).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("s3://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_round_trip_and_refuse_unknown_fields() {
        let id = Identity {
            size: 1 << 30,
            etag: Some("\"6543-abc&=#%\"".into()),
            last_modified: Some("Mon, 07 Dec 2026 03:59:08 GMT".into()),
            sha256: Some("ab".repeat(32)),
        };
        let f = id.to_fragment();
        assert!(!f.contains('#') && !f.contains('"') && !f.contains(' '), "{f}");
        assert_eq!(Identity::parse_fragment(&f).unwrap(), id);
        let small = Identity {
            size: 5,
            ..Identity::default()
        };
        assert_eq!(Identity::parse_fragment(&small.to_fragment()).unwrap(), small);
        for bad in [
            "",
            "etag=x",
            "size=1&size=2",
            "size=1&future=1",
            "size=x",
            "size=1&sha256=zz",
        ] {
            assert!(Identity::parse_fragment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_compare_size_then_the_strongest_validator() {
        let rec = Identity {
            size: 10,
            etag: Some("\"a\"".into()),
            last_modified: Some("d1".into()),
            sha256: None,
        };
        let same = rec.clone();
        assert!(rec.check(&same, "u").is_ok());
        let mut other = rec.clone();
        other.etag = Some("\"b\"".into());
        assert_eq!(rec.check(&other, "u").unwrap_err().kind(), ErrorKind::Changed);
        let mut bigger = rec.clone();
        bigger.size = 11;
        assert!(rec.check(&bigger, "u").is_err());
        // Without a strong ETag the date decides.
        let weak = Identity {
            etag: Some("W/\"a\"".into()),
            ..rec.clone()
        };
        let mut later = weak.clone();
        later.last_modified = Some("d2".into());
        assert!(weak.check(&later, "u").is_err());
        assert!(weak.check(&weak.clone(), "u").is_ok());
    }

    #[test]
    fn hints() {
        assert_eq!(RemoteHint::parse("base.asif").unwrap(), None);
        assert!(RemoteHint::parse("https://h/x.img").is_err());
        let h = RemoteHint {
            url: "s3://bucket/a/b.qcow2".into(),
            identity: Identity {
                size: 3,
                ..Identity::default()
            },
        };
        assert_eq!(RemoteHint::parse(&h.to_hint()).unwrap(), Some(h));
        assert!(is_remote("HTTPS://x") && is_remote("s3://b/k") && !is_remote("s3:/x"));
    }
}
