//! Registry authentication: `WWW-Authenticate` challenges, credentials from the places
//! docker and podman keep them, and the bearer-token exchange.
//!
//! - Challenges (RFC 7235): `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`,
//!   possibly several in one header. Parsed by hand: the grammar is small, and hostile
//!   headers must give an error, never a panic.
//! - Credentials, first found wins: `--creds USER:PASS`; `$REGISTRY_AUTH_FILE`;
//!   `$XDG_RUNTIME_DIR/containers/auth.json` (podman, skopeo); `$DOCKER_CONFIG/config.json`
//!   or `~/.docker/config.json`. Entries are looked up by `host/repository` prefixes first
//!   (containers' convention), then by host; Docker Hub's entry is also found under
//!   `https://index.docker.io/v1/`. Credential helpers (`credsStore`, `credHelpers`) are
//!   not run.
//! - Bearer tokens: `GET realm?service=…&scope=repository:NAME:ACTIONS`, with the
//!   credentials as basic auth when there are any; the answer's `token` (or
//!   `access_token`) is then sent as `Authorization: Bearer …`.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// The largest auth file or token response read.
const MAX_AUTH_JSON: u64 = 4 << 20;

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"…")
            .finish()
    }
}

impl Credentials {
    /// Parse `USER:PASS` (the password may contain `:`).
    pub fn parse(text: &str) -> Result<Credentials> {
        match text.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err(Error::invalid_argument("credentials must be USER:PASSWORD")),
        }
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    /// Decode the `auth` field of an auth file (`base64(USER:PASS)`).
    fn from_auth_field(auth: &str) -> Option<Credentials> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        Credentials::parse(std::str::from_utf8(&raw).ok()?).ok()
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lower case (`bearer`, `basic`).
    pub scheme: String,
    /// Its parameters, names in lower case.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Parse a `WWW-Authenticate` header value into its challenges. Unknown schemes are kept
/// (the caller picks). A header that does not follow the grammar is an error.
pub fn parse_challenges(header: &str) -> Result<Vec<Challenge>> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Network,
            format!(
                "the registry sent a malformed authentication challenge ({why}): '{}'",
                header.chars().take(200).collect::<String>().escape_default()
            ),
        )
    };
    if header.len() > 16 << 10 {
        return Err(bad("too long"));
    }
    let b = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> Option<String> {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        (*i > start).then(|| header[start..*i].to_string())
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        skip_ws(&mut i);
        while i < b.len() && b[i] == b',' {
            i += 1;
            skip_ws(&mut i);
        }
        if i >= b.len() {
            break;
        }
        let scheme = token(&mut i).ok_or_else(|| bad("expected an authentication scheme"))?;
        let mut params = Vec::new();
        skip_ws(&mut i);
        // Parameters: name=value pairs separated by commas, until a token that is not
        // followed by '=' (the next challenge's scheme).
        loop {
            let save = i;
            skip_ws(&mut i);
            let Some(name) = token(&mut i) else {
                i = save;
                break;
            };
            skip_ws(&mut i);
            if i >= b.len() || b[i] != b'=' {
                // The next challenge's scheme.
                i = save;
                break;
            }
            i += 1;
            skip_ws(&mut i);
            let value = if b.get(i) == Some(&b'"') {
                i += 1;
                let mut v = Vec::new();
                loop {
                    match b.get(i) {
                        None => return Err(bad("unterminated quoted string")),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let c = *b.get(i + 1).ok_or_else(|| bad("unterminated quoted string"))?;
                            v.push(c);
                            i += 2;
                        }
                        Some(&c) if c < 0x20 && c != b'\t' => return Err(bad("control character")),
                        Some(&c) => {
                            v.push(c);
                            i += 1;
                        }
                    }
                }
                String::from_utf8(v).map_err(|_| bad("not UTF-8"))?
            } else {
                token(&mut i).ok_or_else(|| bad("expected a parameter value"))?
            };
            params.push((name.to_ascii_lowercase(), value));
            skip_ws(&mut i);
            if i < b.len() && b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        out.push(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        });
        if out.len() > 16 {
            return Err(bad("too many challenges"));
        }
        skip_ws(&mut i);
        if i < b.len() && !is_tchar(b[i]) && b[i] != b',' {
            return Err(bad("unexpected character"));
        }
    }
    if out.is_empty() {
        return Err(bad("no challenge"));
    }
    Ok(out)
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl AuthEntry {
    fn credentials(&self) -> Option<Credentials> {
        if let Some(a) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            return Credentials::from_auth_field(a);
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) if !u.is_empty() => Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        }
    }
}

/// The auth files to look in, in order.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(Path::new(&d).join("containers/auth.json"));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(Path::new(&d).join("config.json"));
    } else if let Some(h) = std::env::var_os("HOME") {
        files.push(Path::new(&h).join(".docker/config.json"));
    }
    files
}

/// Normalise an auth file key: drop a scheme and a trailing `/v1/` or `/v2/` path.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// Find credentials for `registry`/`repository` in the auth files `files` (see the module
/// docs for the order). Unreadable or malformed files are skipped.
pub fn find_credentials(files: &[PathBuf], registry: &str, repository: &str) -> Option<Credentials> {
    for file in files {
        let Ok(f) = std::fs::File::open(file) else {
            continue;
        };
        let mut bytes = Vec::new();
        if std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_AUTH_JSON), &mut bytes).is_err() {
            continue;
        }
        let Ok(parsed) = serde_json::from_slice::<AuthFile>(&bytes) else {
            continue;
        };
        let entries: Vec<(String, &AuthEntry)> =
            parsed.auths.iter().map(|(k, v)| (normalize_key(k), v)).collect();
        // Most specific first: registry/repo/path, registry/repo, ..., registry.
        let full = format!("{registry}/{repository}");
        let mut candidates = vec![full.clone()];
        let mut cur = full.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            candidates.push(parent.to_string());
            cur = parent;
        }
        for c in candidates {
            if let Some(creds) = entries
                .iter()
                .find(|(k, _)| *k == c)
                .and_then(|(_, e)| e.credentials())
            {
                return Some(creds);
            }
        }
    }
    None
}

/// The answer of a token endpoint.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) access_token: Option<String>,
    #[serde(default)]
    pub(crate) expires_in: Option<u64>,
}

/// Parse a token endpoint's answer.
pub(crate) fn parse_token(body: &[u8], realm: &str) -> Result<(String, Option<u64>)> {
    let t: TokenResponse = serde_json::from_slice(body).map_err(|e| {
        Error::new(
            ErrorKind::Network,
            format!("the token service {realm} answered with something that is not a token"),
        )
        .with_source(e)
    })?;
    let token = t
        .token
        .filter(|t| !t.is_empty())
        .or(t.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Network,
                format!("the token service {realm} sent no token"),
            )
        })?;
    if token.len() > 64 << 10 || token.bytes().any(|c| !(0x21..0x7f).contains(&c)) {
        return Err(Error::new(
            ErrorKind::Network,
            format!("the token service {realm} sent a token that cannot be used in a header"),
        ));
    }
    Ok((token, t.expires_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("scope"), Some("repository:library/alpine:pull"));
        let c = parse_challenges(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        let c = parse_challenges(r#"Basic realm="a", Bearer realm="b",service=s"#).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].param("service"), Some("s"));
        let c = parse_challenges(r#"Bearer realm="x\"y""#).unwrap();
        assert_eq!(c[0].param("realm"), Some("x\"y"));
        let c = parse_challenges("Negotiate").unwrap();
        assert_eq!(c[0].scheme, "negotiate");
    }

    #[test]
    fn bad_challenges() {
        for h in [
            "",
            "   ",
            "Bearer realm=\"unterminated",
            "=x",
            "Bearer realm=\"a\u{1}\"",
            "Bearer realm=",
            "\"q\"",
        ] {
            assert!(parse_challenges(h).is_err(), "{h:?}");
        }
        assert!(parse_challenges(&"Bearer a=b,".repeat(5000)).is_err());
    }

    #[test]
    fn credentials_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let docker = dir.path().join("config.json");
        std::fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},"localhost:5000":{"auth":"dTpwOnE="}}}"#,
        )
        .unwrap();
        let containers = dir.path().join("auth.json");
        std::fs::write(
            &containers,
            r#"{"auths":{"localhost:5000/team/app":{"username":"t","password":"x"}}}"#,
        )
        .unwrap();
        let files = vec![containers, docker, dir.path().join("missing.json")];
        let hub = find_credentials(&files, "docker.io", "library/alpine").unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("hub", "secret"));
        let c = find_credentials(&files, "localhost:5000", "team/app").unwrap();
        assert_eq!(c.username, "t");
        let c = find_credentials(&files, "localhost:5000", "other").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:q"));
        assert!(find_credentials(&files, "quay.io", "x").is_none());
        assert_eq!(Credentials::parse("u:p").unwrap().basic_header(), "Basic dTpw");
        assert!(Credentials::parse("nouser").is_err());
    }

    #[test]
    fn tokens() {
        assert_eq!(parse_token(br#"{"token":"abc"}"#, "r").unwrap().0, "abc");
        assert_eq!(
            parse_token(br#"{"access_token":"d","expires_in":60}"#, "r").unwrap(),
            ("d".into(), Some(60))
        );
        assert!(parse_token(br#"{"token":""}"#, "r").is_err());
        assert!(parse_token(b"<html>", "r").is_err());
        assert!(parse_token(br#"{"token":"a\nb"}"#, "r").is_err());
    }
}
