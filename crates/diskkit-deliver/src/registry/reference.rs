//! Image references as users write them: `host[:port]/repo[:tag][@sha256:…]`, with an
//! optional `docker://` prefix, and Docker Hub's short names (`alpine` →
//! `docker.io/library/alpine:latest`) resolved as docker resolves them.
//!
//! The grammar is the distribution project's (`reference` package): the first path
//! component is a registry host only if it contains `.` or `:`, is `localhost`, or has an
//! upper-case letter; repository components are lower-case alphanumerics joined by `.`,
//! `_`, `__` or runs of `-`; a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; the whole name is
//! at most 255 characters.

use std::fmt;

use crate::error::{Error, Result};

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The longest repository name (with its registry) accepted.
const MAX_NAME: usize = 255;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// The registry as written (`docker.io` for Docker Hub), with its port if any.
    pub registry: String,
    /// The repository path (`library/alpine`).
    pub repository: String,
    /// The tag, if one was given (see [`Reference::tag_or_latest`]).
    pub tag: Option<String>,
    /// The manifest digest (`sha256:…`), if one was given.
    pub digest: Option<String>,
}

fn bad(text: &str, why: &str) -> Error {
    Error::invalid_argument(format!("invalid image reference '{text}': {why}"))
}

/// Whether `c` is a valid repository path component.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__` or a run of `-`, between alphanumerics.
        let start = i;
        match ch {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if b.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if start == 0
            || !b
                .get(i)
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return false;
        }
    }
    true
}

/// Whether `h` is a valid registry host (`name[.name…][:port]`, or `[v6]:port`).
fn valid_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.is_empty() || !v6.bytes().all(|c| c.is_ascii_hexdigit() || c == b':') {
            return false;
        }
        match after.strip_prefix(':') {
            Some(p) => ("v6", Some(p)),
            None if after.is_empty() => ("v6", None),
            None => return false,
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    host == "v6"
        || (!host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }))
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Check a digest: `sha256:` and 64 lower-case hex digits. Other algorithms are refused
/// (nothing here can verify them).
pub fn check_digest(d: &str) -> Result<()> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err(Error::invalid_argument(format!(
            "'{d}' is not a digest (ALGORITHM:HEX)"
        )));
    };
    if algo != "sha256" {
        return Err(Error::invalid_argument(format!(
            "digest '{d}': only sha256 digests are supported"
        )));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(Error::invalid_argument(format!(
            "digest '{}': expected 64 lower-case hex digits",
            d.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

impl Reference {
    /// Parse a reference as docker does.
    pub fn parse(text: &str) -> Result<Reference> {
        let s = text.strip_prefix("docker://").unwrap_or(text);
        if s.is_empty() {
            return Err(bad(text, "it is empty"));
        }
        if s.len() > 1024 {
            return Err(bad(&text[..64], "it is too long"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                check_digest(d).map_err(|e| bad(text, e.message().unwrap_or("bad digest")))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' after the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(bad(text, &format!("'{t}' is not a valid tag")));
            }
        }
        let (registry, repository) = match path.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[')
                    || first.bytes().any(|c| c.is_ascii_uppercase()) =>
            {
                if !valid_host(first) {
                    return Err(bad(text, &format!("'{first}' is not a valid registry host")));
                }
                let reg = if first == "index.docker.io" {
                    DOCKER_HUB
                } else {
                    first
                };
                (reg.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), path.to_string()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() {
            return Err(bad(text, "no repository name"));
        }
        if let Some(c) = repository.split('/').find(|c| !valid_component(c)) {
            let why = if c.bytes().any(|b| b.is_ascii_uppercase()) {
                format!("repository names must be lower case ('{c}')")
            } else {
                format!("'{c}' is not a valid repository name component")
            };
            return Err(bad(text, &why));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(bad(text, "the name is longer than 255 characters"));
        }
        Ok(Reference {
            registry,
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The tag, or `latest` when neither tag nor digest was given. `None` for a reference
    /// by digest only.
    pub fn tag_or_latest(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(t), _) => Some(t),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }

    /// What names the manifest in the API: the digest if given, else the tag (or
    /// `latest`).
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }

    /// The host the registry API is served from (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`, `[::1]`):
    /// plain HTTP is allowed there without `--insecure`, as docker allows it.
    pub fn is_local(&self) -> bool {
        let host = self.registry.strip_prefix('[').map_or_else(
            || {
                self.registry
                    .rsplit_once(':')
                    .map_or(self.registry.as_str(), |(h, _)| h)
            },
            |r| r.split_once(']').map_or(r, |(h, _)| h),
        );
        host == "localhost"
            || host == "::1"
            || host
                .strip_prefix("127.")
                .is_some_and(|r| r.split('.').count() == 3 && r.split('.').all(|o| o.parse::<u8>().is_ok()))
    }

    /// The same repository with another tag or digest.
    pub fn with_manifest(&self, tag: Option<&str>, digest: Option<&str>) -> Reference {
        Reference {
            tag: tag.map(str::to_string),
            digest: digest.map(str::to_string),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    /// The full normalised form: `registry/repository[:tag][@digest]`, with `:latest` when
    /// neither was given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => write!(f, ":{t}@{d}"),
            (Some(t), None) => write!(f, ":{t}"),
            (None, Some(d)) => write!(f, "@{d}"),
            (None, None) => write!(f, ":latest"),
        }
    }
}

impl std::str::FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Reference> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(r("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(r("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(r("docker://alpine"), "docker.io/library/alpine:latest");
        assert_eq!(r("user/app"), "docker.io/user/app:latest");
        assert_eq!(r("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(r("index.docker.io/user/app:1"), "docker.io/user/app:1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(r(&format!("alpine@{d}")), format!("docker.io/library/alpine@{d}"));
        assert_eq!(
            r(&format!("alpine:1@{d}")),
            format!("docker.io/library/alpine:1@{d}")
        );
        let p = Reference::parse("alpine").unwrap();
        assert_eq!(p.api_host(), "registry-1.docker.io");
        assert_eq!(p.manifest_reference(), "latest");
    }

    #[test]
    fn hosts() {
        assert_eq!(r("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(r("localhost/x:t"), "localhost/x:t");
        assert_eq!(
            r("quay.io/fedora/fedora-bootc:42"),
            "quay.io/fedora/fedora-bootc:42"
        );
        assert_eq!(r("Registry/x"), "Registry/x:latest");
        assert_eq!(r("[::1]:5000/a/b"), "[::1]:5000/a/b:latest");
        assert!(Reference::parse("localhost:5000/x").unwrap().is_local());
        assert!(Reference::parse("127.0.0.1:5000/x").unwrap().is_local());
        assert!(Reference::parse("[::1]:5000/x").unwrap().is_local());
        assert!(!Reference::parse("example.com/x").unwrap().is_local());
        assert!(!Reference::parse("127.0.0.1.evil.com/x").unwrap().is_local());
        // A component with a dot but no slash after it is a repository, not a host.
        assert_eq!(r("my.app"), "docker.io/library/my.app:latest");
    }

    #[test]
    fn components() {
        for ok in ["a", "a-b", "a--b", "a_b", "a__b", "a.b", "a0/b1/c2"] {
            assert!(Reference::parse(&format!("h.io/{ok}")).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "h.io/",
            "h.io/A",
            "h.io/a_",
            "h.io/_a",
            "h.io/a___b",
            "h.io/a..b",
            "h.io/a//b",
            "h.io/a b",
            "h.io/a:",
            "h.io/a:-x",
            "h.io/a@sha256:abc",
            "h.io/a@md5:00",
            "bad host!/x",
            "h.io:99999x/a",
            "h.io/a/../b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        let long = format!("h.io/{}", "a".repeat(260));
        assert!(Reference::parse(&long).is_err());
        assert!(Reference::parse(&format!("h.io/a:{}", "t".repeat(129))).is_err());
    }
}
