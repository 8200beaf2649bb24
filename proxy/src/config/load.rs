//! Reading a config file: YAML (or JSON) text → [`Config`], with errors that name the field.

use super::Config;
use std::path::Path;

/// Why a config could not be loaded or validated. `check` exits 64 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Path that failed.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The text is not a valid config (syntax, unknown or mistyped field).
    #[error("{0}")]
    Parse(String),
    /// The config parsed but says something invalid.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted field path, e.g. `tools[2].match.path`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A policy module does not compile.
    #[error("policy: {0}")]
    Policy(String),
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parse config text. Errors carry the field path and line, e.g.
/// `tools[0].match: unknown field "hots" at line 7 column 5`.
pub fn parse_str(text: &str) -> Result<Config, ConfigError> {
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error_lite(de).map_err(ConfigError::Parse)
}

fn serde_path_to_error_lite(de: yaml_serde::Deserializer<'_>) -> Result<Config, String> {
    use serde::Deserialize;
    Config::deserialize(de).map_err(|e| {
        // yaml_serde already reports the dotted path of the failing field
        // ("tools[0].match: unknown field ...") plus line and column.
        e.to_string()
    })
}

/// Read and parse a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_str(&text)
}
