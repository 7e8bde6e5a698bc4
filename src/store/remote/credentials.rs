//! Credentials: from the AWS environment or, for what it leaves unset, the `AWS_PROFILE`
//! profile of the AWS shared files; and every message blanked of them.

use std::path::PathBuf;

use object_store::aws::AmazonS3ConfigKey;

/// Settings from the AWS shared files (`~/.aws/credentials`, `~/.aws/config`, or the files
/// `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE` name) for the profile `AWS_PROFILE`
/// (default `default`), for what the environment leaves unset.
pub(super) fn profile_settings() -> Vec<(AmazonS3ConfigKey, String)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(home) = env("HOME").map(PathBuf::from) else {
        return Vec::new();
    };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
    let load = |var: &str, default: &str| {
        let path = env(var).map(PathBuf::from).unwrap_or(home.join(default));
        ini::Ini::load_from_file(path).ok()
    };
    let mut out = Vec::new();
    if env("AWS_ACCESS_KEY_ID").is_none() {
        if let Some(creds) = load("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") {
            if let Some(s) = creds.section(Some(profile.as_str())) {
                for (field, key) in [
                    ("aws_access_key_id", AmazonS3ConfigKey::AccessKeyId),
                    ("aws_secret_access_key", AmazonS3ConfigKey::SecretAccessKey),
                    ("aws_session_token", AmazonS3ConfigKey::Token),
                ] {
                    if let Some(v) = s.get(field) {
                        out.push((key, v.to_string()));
                    }
                }
            }
        }
    }
    if let Some(config) = load("AWS_CONFIG_FILE", ".aws/config") {
        let section = match profile.as_str() {
            "default" => "default".to_string(),
            p => format!("profile {p}"),
        };
        if let Some(s) = config.section(Some(section.as_str())) {
            if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
                if let Some(v) = s.get("region") {
                    out.push((AmazonS3ConfigKey::Region, v.to_string()));
                }
            }
            if env("AWS_ENDPOINT_URL").is_none() {
                if let Some(v) = s.get("endpoint_url") {
                    out.push((AmazonS3ConfigKey::Endpoint, v.to_string()));
                }
            }
        }
    }
    out
}

/// The credential values present in the environment (to blank out of messages).
pub(super) fn env_secrets() -> Vec<String> {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .filter(|v| !v.is_empty())
    .collect()
}

/// `text` with every secret replaced by `***`.
pub(super) fn redact(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 4)
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}
