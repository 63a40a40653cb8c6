//! A pipeline's `source`: parsed once, when the configuration is read, into the connection
//! settings every user of it takes (the pipeline, `philotes check`, the log scrubber).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::source::postgres::conn::SourceUrl;

/// A pipeline's `source` URL and its parsed settings. `Debug` and `Serialize` show the URL
/// with its password replaced by `***`.
#[derive(Clone)]
pub struct Source {
    text: String,
    url: SourceUrl,
}

impl Source {
    /// Parse a libpq-style URL.
    pub fn parse(text: &str) -> Result<Self, crate::source::postgres::conn::UrlError> {
        Ok(Self {
            url: SourceUrl::parse(text)?,
            text: text.to_string(),
        })
    }

    /// The connection settings.
    pub fn url(&self) -> &SourceUrl {
        &self.url
    }

    /// The URL as written, password included: for the log scrubber and identity checks only.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The URL with its password hidden.
    pub fn redacted(&self) -> String {
        super::redact_url(&self.text)
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Source::parse(&text).map_err(serde::de::Error::custom)
    }
}
