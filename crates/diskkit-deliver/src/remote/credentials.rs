//! Temporary S3 credentials from the sources the AWS CLI reads after the environment and the
//! shared files: the profile's `credential_process`, a container's credentials endpoint
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI` / `_RELATIVE_URI`, ECS and EKS pod identity) and the
//! EC2 instance metadata service (IMDSv2; `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides where
//! it is, `AWS_EC2_METADATA_DISABLED=true` turns it off). They expire, so they are fetched
//! again five minutes before their `Expiration`.
//!
//! Written by hand: the AWS SDK is asynchronous and large; each source is one or three small
//! HTTP requests or one command, answering the same JSON shape.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusty_s3::Credentials;
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::http::{Body, Client, ClientOptions, Method, RetryPolicy};

/// Where temporary credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A command (`sh -c`) printing the credentials as JSON (`credential_process`).
    Process(String),
    /// A container credentials endpoint, with the `Authorization` value to send, if any.
    Container { url: String, token: Option<String> },
    /// The instance metadata service at this base URL.
    Imds(String),
}

/// The JSON all three sources answer with (a process says `SessionToken`, the endpoints
/// `Token`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    access_key_id: String,
    secret_access_key: String,
    #[serde(alias = "Token")]
    session_token: Option<String>,
    expiration: Option<String>,
}

/// Credentials fetched from a [`Source`], fetched again shortly before they expire.
#[derive(Debug)]
pub(crate) struct Refreshing {
    source: Source,
    current: Mutex<(Credentials, Option<u64>)>,
}

/// How long before their expiry credentials are replaced.
const EARLY: u64 = 300;

impl Refreshing {
    /// Fetch credentials from `source` now.
    pub(crate) fn fetch(source: Source) -> Result<Refreshing> {
        let first = get(&source)?;
        Ok(Refreshing {
            source,
            current: Mutex::new(first),
        })
    }

    /// Credentials valid for a while yet (fetched again if they are about to expire).
    pub(crate) fn current(&self) -> Result<Credentials> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.1.is_some_and(|exp| now() + EARLY >= exp) {
            *cur = get(&self.source)?;
        }
        Ok(cur.0.clone())
    }
}

/// The first source the environment and the profile's `process` (its `credential_process`)
/// name, in the AWS CLI's order: process, container, instance metadata.
pub(crate) fn find(process: Option<String>) -> Option<Source> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(p) = process {
        return Some(Source::Process(p));
    }
    let token = env("AWS_CONTAINER_AUTHORIZATION_TOKEN");
    if let Some(url) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        return Some(Source::Container { url, token });
    }
    if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        return Some(Source::Container {
            url: format!("http://169.254.170.2{rel}"),
            token,
        });
    }
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| "http://169.254.169.254".into());
    Some(Source::Imds(base.trim_end_matches('/').to_string()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn get(source: &Source) -> Result<(Credentials, Option<u64>)> {
    let text = match source {
        Source::Process(cmd) => run_process(cmd)?,
        Source::Container { url, token } => {
            let headers: Vec<(&str, &str)> = token.iter().map(|t| ("Authorization", t.as_str())).collect();
            http_text(&quick_client()?, Method::Get, url, &headers)?
        }
        Source::Imds(base) => {
            // One client (and connection) for the three requests.
            let client = quick_client()?;
            let ttl = [("X-aws-ec2-metadata-token-ttl-seconds", "21600")];
            let token = http_text(&client, Method::Put, &format!("{base}/latest/api/token"), &ttl)?;
            let auth = [("X-aws-ec2-metadata-token", token.trim())];
            let list = format!("{base}/latest/meta-data/iam/security-credentials/");
            let roles = http_text(&client, Method::Get, &list, &auth)?;
            let role = roles
                .lines()
                .next()
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| Error::new(ErrorKind::Authentication, "the instance has no IAM role"))?;
            http_text(&client, Method::Get, &format!("{list}{role}"), &auth)?
        }
    };
    let what = describe(source);
    let answer: Answer = serde_json::from_str(&text).map_err(|e| {
        Error::new(
            ErrorKind::Authentication,
            format!("{what} did not answer with credentials"),
        )
        .with_source(e)
    })?;
    let expiry = match &answer.expiration {
        Some(t) => Some(parse_utc(t).ok_or_else(|| {
            Error::new(
                ErrorKind::Authentication,
                format!("{what} gave an expiration that is not a UTC time: '{t}'"),
            )
        })?),
        None => None,
    };
    let credentials = match answer.session_token {
        Some(t) => Credentials::new_with_token(answer.access_key_id, answer.secret_access_key, t),
        None => Credentials::new(answer.access_key_id, answer.secret_access_key),
    };
    Ok((credentials, expiry))
}

fn describe(source: &Source) -> String {
    match source {
        Source::Process(cmd) => format!("credential_process '{cmd}'"),
        Source::Container { url, .. } => format!("the container credentials endpoint {url}"),
        Source::Imds(base) => format!("the instance metadata service at {base}"),
    }
}

/// Run a `credential_process` command; its standard output.
fn run_process(cmd: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::io_while(e, "running credential_process"))?;
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Authentication,
            format!("credential_process '{cmd}' failed ({})", out.status),
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| {
        Error::new(
            ErrorKind::Authentication,
            format!("credential_process '{cmd}' printed something that is not UTF-8"),
        )
    })
}

/// A client for these endpoints: 1 s timeouts, no retry, as the AWS CLI does, so a machine
/// without them is not held up.
fn quick_client() -> Result<Client> {
    Client::new(&ClientOptions {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        retry: RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        },
        follow_redirects: false,
        ..ClientOptions::default()
    })
}

/// One request; the body of a 2xx answer, at most 64 KiB.
fn http_text(client: &Client, method: Method, url: &str, headers: &[(&str, &str)]) -> Result<String> {
    use std::io::Read;
    let mut resp = client.send(method, url, headers, Body::Empty)?;
    if !(200..300).contains(&resp.head.status) {
        return Err(crate::http::status_error(resp.head.status, url));
    }
    let mut text = String::new();
    resp.body()
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| Error::io_while(e, "reading credentials from the metadata endpoint"))?;
    Ok(text)
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z` (or `+00:00`) as seconds since the epoch.
fn parse_utc(text: &str) -> Option<u64> {
    let t = text.trim();
    let body = t.strip_suffix('Z').or_else(|| t.strip_suffix("+00:00"))?;
    let (date, time) = body.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut h = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(parse_utc("2026-12-07T09:30:15.123Z"), Some(1_796_635_815));
        assert_eq!(parse_utc("2026-12-07T09:30:15+00:00"), Some(1_796_635_815));
        assert_eq!(parse_utc("2026-13-07T09:30:15Z"), None);
        assert_eq!(parse_utc("2026-12-07 09:30:15"), None);
    }

    #[test]
    fn a_process_gives_credentials_and_a_failing_one_is_an_error() {
        let json = r#"{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "SK", "SessionToken": "T", "Expiration": "2999-01-01T00:00:00Z"}"#;
        let r = Refreshing::fetch(Source::Process(format!("printf '%s' '{json}'"))).unwrap();
        let c = r.current().unwrap();
        assert_eq!((c.key(), c.secret(), c.token()), ("AK", "SK", Some("T")));
        let e = Refreshing::fetch(Source::Process("exit 3".into())).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
        let e = Refreshing::fetch(Source::Process("echo nope".into())).unwrap_err();
        assert!(e.to_string().contains("did not answer with credentials"), "{e}");
    }

    #[test]
    fn expired_credentials_are_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let n = dir.path().join("n");
        // Each run counts itself; the credentials expire at once.
        let cmd = format!(
            "echo x >> '{}'; printf '{{\"AccessKeyId\":\"AK%s\",\"SecretAccessKey\":\"S\",\"Expiration\":\"2000-01-01T00:00:00Z\"}}' $(wc -l < '{}')",
            n.display(),
            n.display()
        );
        let r = Refreshing::fetch(Source::Process(cmd)).unwrap();
        assert_eq!(r.current().unwrap().key(), "AK2");
        assert_eq!(r.current().unwrap().key(), "AK3");
    }
}
