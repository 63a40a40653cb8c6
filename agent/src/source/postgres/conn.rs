//! Source URL parsing (`postgres://user:password@host:port/db?sslmode=...`) into connection settings.

use std::path::PathBuf;
use std::time::Duration;

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it (also `allow`), certificate not checked.
    Prefer,
    /// TLS, certificate not checked.
    Require,
    /// TLS, certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

/// libpq `channel_binding`: binding SCRAM to the TLS channel (`tls-server-end-point`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBindingMode {
    /// Never bind.
    Disable,
    /// Bind when the connection uses TLS and the server offers SCRAM-SHA-256-PLUS.
    Prefer,
    /// Refuse to authenticate without channel binding.
    Require,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A source URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not parseable as a URL.
    #[error("not a postgres URL: {0}")]
    Syntax(String),
    /// Wrong scheme.
    #[error("scheme must be postgres:// or postgresql://, got {0:?}")]
    Scheme(String),
    /// A missing part.
    #[error("source URL has no {0}")]
    Missing(&'static str),
    /// A bad query parameter.
    #[error("source URL parameter {0}: {1}")]
    Param(String, String),
}

/// A parsed PostgreSQL source URL. `Debug` never shows the password.
#[derive(Clone)]
pub struct SourceUrl {
    /// Host name, address, or a unix socket directory (starts with `/`).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role name.
    pub user: String,
    /// Password (may be empty).
    pub password: String,
    /// Database name.
    pub database: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full.
    pub sslrootcert: Option<PathBuf>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// SCRAM channel binding.
    pub channel_binding: ChannelBindingMode,
}

impl std::fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.display())
    }
}

impl SourceUrl {
    /// Parse a libpq-style URL.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let u = url::Url::parse(s).map_err(|e| UrlError::Syntax(e.to_string()))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(UrlError::Scheme(u.scheme().to_string()));
        }
        let decode = |v: &str| {
            url::form_urlencoded::parse(format!("x={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let mut host = u.host_str().unwrap_or_default().to_string();
        let mut port = u.port().unwrap_or(5432);
        let mut user = decode(u.username());
        let mut password = u.password().map(decode).unwrap_or_default();
        let mut database = decode(u.path().trim_start_matches('/'));
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        let mut connect_timeout = Duration::from_secs(10);
        let mut channel_binding = ChannelBindingMode::Prefer;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    sslmode = match v.as_ref() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(UrlError::Param(
                                "sslmode".into(),
                                format!("unknown value {other:?}"),
                            ))
                        }
                    }
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v.as_ref())),
                "host" => host = v.into_owned(),
                "port" => {
                    port = v
                        .parse()
                        .map_err(|_| UrlError::Param("port".into(), "not a port".into()))?
                }
                "user" => user = v.into_owned(),
                "password" => password = v.into_owned(),
                "dbname" => database = v.into_owned(),
                "connect_timeout" => {
                    let secs: u64 = v.parse().map_err(|_| {
                        UrlError::Param("connect_timeout".into(), "not a number of seconds".into())
                    })?;
                    connect_timeout = Duration::from_secs(secs.max(1));
                }
                "channel_binding" => {
                    channel_binding = match v.as_ref() {
                        "disable" => ChannelBindingMode::Disable,
                        "prefer" => ChannelBindingMode::Prefer,
                        "require" => ChannelBindingMode::Require,
                        other => {
                            return Err(UrlError::Param(
                                "channel_binding".into(),
                                format!("unknown value {other:?}"),
                            ))
                        }
                    }
                }
                "application_name" | "options" => {}
                other => {
                    return Err(UrlError::Param(
                        other.to_string(),
                        "unsupported parameter".into(),
                    ))
                }
            }
        }
        if host.is_empty() {
            return Err(UrlError::Missing("host"));
        }
        if user.is_empty() {
            return Err(UrlError::Missing("user"));
        }
        if database.is_empty() {
            return Err(UrlError::Missing("database"));
        }
        Ok(Self {
            host,
            port,
            user,
            password,
            database,
            sslmode,
            sslrootcert,
            connect_timeout,
            channel_binding,
        })
    }

    /// `user@host:port/db` without the password, for logs and errors.
    pub fn display(&self) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }

    /// Startup parameters of a replication session (besides user and database).
    pub fn startup_options() -> [(&'static str, &'static str); 3] {
        [
            ("replication", "database"),
            ("application_name", "philotes"),
            // Text output must be parseable the same way on every server.
            (
                "options",
                "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 \
                 -c extra_float_digits=3 -c bytea_output=hex -c client_encoding=UTF8",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hides_password() {
        let u =
            SourceUrl::parse("postgres://bob:p%40ss@db.local:6543/shop?sslmode=require").unwrap();
        assert_eq!(u.host, "db.local");
        assert_eq!(u.port, 6543);
        assert_eq!(u.password, "p@ss");
        assert_eq!(u.sslmode, SslMode::Require);
        assert!(!format!("{u:?}").contains("p@ss"));
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(SourceUrl::parse("mysql://a@b/c").is_err());
        assert!(SourceUrl::parse("postgres://a@b/c?sslmode=maybe").is_err());
        assert!(SourceUrl::parse("postgres://b/c").is_err());
        assert!(SourceUrl::parse("postgres://a@b/").is_err());
    }
}
