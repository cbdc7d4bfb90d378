//! Configuration: one serde struct per service, read from a TOML file section and overridden by
//! `MESHGATE_<SECTION>__<KEY>` environment variables (`__` separates nested keys). Unknown keys
//! are rejected by the structs themselves (`#[serde(deny_unknown_fields)]`), so a typo fails fast.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration that could not be read or did not validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
    #[error("configuration [{section}]: {source}")]
    Invalid {
        section: String,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("configuration file {path}: unknown section [{section}] (known: {known})")]
    UnknownSection { path: String, section: String, known: String },
}

/// The environment prefix of a section, e.g. `MESHGATE_QUOTA__`.
pub fn env_prefix(section: &str) -> String {
    format!("MESHGATE_{}__", section.to_ascii_uppercase())
}

/// Loads section `section` of `file` (when given) over `T::default()`, then the environment.
pub fn load<T>(section: &str, file: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_with_defaults(section, file, T::default())
}

/// Like [`load`], starting from `defaults` instead of `T::default()`.
pub fn load_with_defaults<T>(section: &str, file: Option<&Path>, defaults: T) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::File { path: path.display().to_string(), message: "does not exist".into() });
        }
        figment = figment.merge(Figment::from(Toml::file(path)).focus(section));
    }
    figment = figment.merge(Env::prefixed(&env_prefix(section)).split("__"));
    figment.extract().map_err(|source| ConfigError::Invalid { section: section.into(), source: Box::new(source) })
}

/// Rejects top-level sections of `file` that no component reads.
pub fn check_sections(file: &Path, known: &[&str]) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|err| ConfigError::File { path: file.display().to_string(), message: err.to_string() })?;
    let table: figment::value::Dict = Figment::from(Toml::string(&text))
        .extract()
        .map_err(|err| ConfigError::File { path: file.display().to_string(), message: err.to_string() })?;
    for section in table.keys() {
        if !known.contains(&section.as_str()) {
            return Err(ConfigError::UnknownSection {
                path: file.display().to_string(),
                section: section.clone(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        limit: u64,
        name: String,
        nested: Nested,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        timeout_ms: u64,
    }

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    // figment's Jail closure returns figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn file_section_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("meshgate.toml", "[sample]\nlimit = 5\nname = \"from-file\"\n[other]\nx = 1\n")?;
            let cfg: Sample = load("sample", Some(Path::new("meshgate.toml"))).unwrap();
            assert_eq!(cfg, Sample { limit: 5, name: "from-file".into(), nested: Nested::default() });

            jail.set_env("MESHGATE_SAMPLE__LIMIT", "9");
            jail.set_env("MESHGATE_SAMPLE__NESTED__TIMEOUT_MS", "250");
            let cfg: Sample = load("sample", Some(Path::new("meshgate.toml"))).unwrap();
            assert_eq!(cfg.limit, 9);
            assert_eq!(cfg.name, "from-file");
            assert_eq!(cfg.nested.timeout_ms, 250);

            jail.set_env("MESHGATE_SAMPLE__LIMTI", "1");
            assert!(load::<Sample>("sample", None).unwrap_err().to_string().contains("limti"));
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let f = file("[sample]\nlimt = 5\n");
        let err = load::<Sample>("sample", Some(f.path())).unwrap_err().to_string();
        assert!(err.contains("limt"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load::<Sample>("sample", Some(Path::new("/nonexistent/meshgate.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }));
    }

    #[test]
    fn unknown_sections_are_rejected() {
        let f = file("[sample]\nlimit = 1\n[smaple]\nlimit = 2\n");
        let err = check_sections(f.path(), &["sample"]).unwrap_err().to_string();
        assert!(err.contains("smaple"), "{err}");
        check_sections(file("[sample]\n").path(), &["sample"]).unwrap();
    }
}
