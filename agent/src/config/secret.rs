//! One type for every secret of the configuration: it prints and serializes as `***` (so
//! `Debug`, log lines and `/api/v1/config` cannot leak it), and its value is reached only
//! through [`Secret::expose`], where it is handed to a client or collected for the log
//! scrubber ([`super::Config::secrets`]).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string (token, key, credential).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (an unset `${VAR:-}`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn a_secret_never_prints_or_serializes_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(serde_json::to_string(&s).ok().as_deref(), Some("\"***\""));
        assert_eq!(s.expose(), "hunter2");
        let back: Secret = serde_json::from_str("\"abc\"").unwrap_or_default();
        assert_eq!(back.expose(), "abc");
    }
}
