//! S3 objects: addresses, credentials and region found the way the AWS CLI finds them, and
//! SigV4-signed requests.
//!
//! Signing is `rusty-s3`'s (presigned URLs: the signature is in the query string, so the
//! request goes through the ordinary HTTP client with its retries and keep-alive). What the
//! AWS CLI reads, in its order, is done here by hand because no small synchronous crate does
//! it:
//!
//! - credentials: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), then
//!   the profile's `aws_access_key_id`/`aws_secret_access_key`/`aws_session_token` in
//!   `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`), then in `~/.aws/config`
//!   (`AWS_CONFIG_FILE`, section `[profile NAME]`, or `[default]`); none found means anonymous
//!   (unsigned) requests, which public buckets answer;
//! - the profile: `AWS_PROFILE`, else `default`;
//! - the region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, else `us-east-1`;
//! - the endpoint: `--s3-endpoint`, else `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the
//!   profile's `endpoint_url`, else AWS (`https://s3.REGION.amazonaws.com`, virtual-hosted
//!   style). A custom endpoint (MinIO, Ceph, moto, ...) is addressed path-style.
//!
//!   then temporary credentials from the profile's `credential_process`, a container's
//!   credentials endpoint or the EC2 instance metadata service (see [`super::credentials`]);
//!   none found means anonymous (unsigned) requests.
//!
//! SSO and assumed roles are not read (the user can export the variables `aws configure
//! export-credentials` prints, or name that command as the profile's `credential_process`).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::credentials::{self, Refreshing, Source};
use crate::error::{Error, Result};

/// How long a presigned request stays valid (each request is signed just before it is sent).
const PRESIGN_FOR: Duration = Duration::from_secs(15 * 60);

/// Where S3 settings come from, besides the environment and the AWS files.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// The endpoint (`--s3-endpoint`), for S3-compatible stores.
    pub endpoint: Option<String>,
    /// The region, overriding the environment and the profile.
    pub region: Option<String>,
    /// The profile, overriding `AWS_PROFILE`.
    pub profile: Option<String>,
}

/// An S3 object with what it takes to sign requests for it.
pub struct S3Location {
    bucket: Bucket,
    key: String,
    credentials: Creds,
    url: String,
}

/// How requests are signed.
#[derive(Debug)]
enum Creds {
    Anonymous,
    Static(Credentials),
    Temporary(Refreshing),
}

impl fmt::Debug for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Location")
            .field("url", &self.url)
            .field("endpoint", &self.bucket.base_url().as_str())
            .field("signed", &!matches!(self.credentials, Creds::Anonymous))
            .finish()
    }
}

impl S3Location {
    /// Resolve `s3://BUCKET/KEY` with `options`, the environment and the AWS files.
    pub fn resolve(url: &str, options: &S3Options) -> Result<S3Location> {
        let (bucket, key) = parse_s3_url(url)?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let profile_name = options
            .profile
            .clone()
            .or_else(|| env("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let file = |var: &str, name: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
        };
        let credentials_file = read_ini(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
        let config_file = read_ini(file("AWS_CONFIG_FILE", "config"))?;
        let config_section = if profile_name == "default" {
            "default".to_string()
        } else {
            format!("profile {profile_name}")
        };
        let from_files = |key: &str| {
            credentials_file
                .get(&profile_name)
                .and_then(|s| s.get(key))
                .or_else(|| config_file.get(&config_section).and_then(|s| s.get(key)))
                .cloned()
        };
        let profile_value = |key: &str| config_file.get(&config_section).and_then(|s| s.get(key)).cloned();
        let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(s)) => Creds::Static(match env("AWS_SESSION_TOKEN") {
                Some(t) => Credentials::new_with_token(k, s, t),
                None => Credentials::new(k, s),
            }),
            _ => match (
                from_files("aws_access_key_id"),
                from_files("aws_secret_access_key"),
            ) {
                (Some(k), Some(s)) => Creds::Static(match from_files("aws_session_token") {
                    Some(t) => Credentials::new_with_token(k, s, t),
                    None => Credentials::new(k, s),
                }),
                _ => match credentials::find(from_files("credential_process")) {
                    // Not on EC2 (or no role): anonymous, as the AWS CLI would be unsigned.
                    Some(source @ Source::Imds(_)) => {
                        Refreshing::fetch(source).map_or(Creds::Anonymous, Creds::Temporary)
                    }
                    // Named by the user: its failure is an error.
                    Some(source) => Creds::Temporary(Refreshing::fetch(source)?),
                    None => Creds::Anonymous,
                },
            },
        };
        let region = options
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| profile_value("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let custom = options
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| profile_value("endpoint_url"));
        let (endpoint, style) = match &custom {
            Some(e) => (e.clone(), UrlStyle::Path),
            None => (
                format!("https://s3.{region}.amazonaws.com"),
                UrlStyle::VirtualHost,
            ),
        };
        let endpoint_url: url::Url = endpoint.parse().map_err(|e| {
            Error::invalid_argument(format!("the S3 endpoint '{endpoint}' is not a URL")).with_source(e)
        })?;
        let bucket = Bucket::new(endpoint_url, style, bucket, region).map_err(|e| {
            Error::invalid_argument(format!("the S3 endpoint '{endpoint}' cannot address a bucket"))
                .with_source(e)
        })?;
        Ok(S3Location {
            bucket,
            key,
            credentials,
            url: url.to_string(),
        })
    }

    /// The `s3://` URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The host requests go to (what `--allow-remote` names for S3 is the bucket; see the
    /// resolver).
    pub fn endpoint_host(&self) -> Option<&str> {
        self.bucket.base_url().host_str()
    }

    /// The credentials to sign with now (temporary ones fetched again near their expiry).
    fn signing(&self) -> Result<Option<Credentials>> {
        match &self.credentials {
            Creds::Anonymous => Ok(None),
            Creds::Static(c) => Ok(Some(c.clone())),
            Creds::Temporary(r) => r.current().map(Some),
        }
    }

    /// A signed GET URL for the object.
    pub(crate) fn presign_get(&self) -> Result<url::Url> {
        let credentials = self.signing()?;
        Ok(self
            .bucket
            .get_object(credentials.as_ref(), &self.key)
            .sign(PRESIGN_FOR))
    }

    /// A signed HEAD URL for the object.
    pub(crate) fn presign_head(&self) -> Result<url::Url> {
        let credentials = self.signing()?;
        Ok(self
            .bucket
            .head_object(credentials.as_ref(), &self.key)
            .sign(PRESIGN_FOR))
    }
}

/// Split `s3://BUCKET/KEY`.
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| {
        Error::invalid_argument(format!(
            "'{url}' is not an S3 object URL (s3://BUCKET/KEY): {why}"
        ))
    };
    let rest = url
        .get(..5)
        .filter(|s| s.eq_ignore_ascii_case("s3://"))
        .map(|_| &url[5..])
        .ok_or_else(|| bad("no s3:// prefix"))?;
    let (bucket, key) = rest.split_once('/').ok_or_else(|| bad("no key"))?;
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(bad("invalid bucket name"));
    }
    if key.is_empty() || key.len() > 1024 || key.contains(['\0', '#', '?']) {
        return Err(bad("invalid key"));
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// An INI file as sections of key = value; an absent file is empty.
fn read_ini(path: Option<PathBuf>) -> Result<HashMap<String, HashMap<String, String>>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Some(path) = path else { return Ok(out) };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io_while(e, "reading AWS settings").with_path(&path)),
    };
    let mut section: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if let (Some(s), Some((k, v))) = (&section, line.split_once('=')) {
            out.entry(s.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok(out)
}

impl From<S3Location> for super::object::Address {
    fn from(l: S3Location) -> Self {
        super::object::Address::S3(Box::new(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_s3_url("s3://my-bucket/dir/disk.qcow2").unwrap(),
            ("my-bucket".into(), "dir/disk.qcow2".into())
        );
        for bad in [
            "s3://",
            "s3://b/k",
            "s3://Bucket/k",
            "s3://bucket",
            "s3://bucket/",
            "http://x/y",
        ] {
            assert!(parse_s3_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ini_sections() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config");
        std::fs::write(
            &p,
            "[default]\nregion = eu-west-1\n# c\n[profile x]\nAWS_Access_Key_Id=k\n",
        )
        .unwrap();
        let ini = read_ini(Some(p)).unwrap();
        assert_eq!(ini["default"]["region"], "eu-west-1");
        assert_eq!(ini["profile x"]["aws_access_key_id"], "k");
        assert!(read_ini(Some(d.path().join("none"))).unwrap().is_empty());
    }
}
