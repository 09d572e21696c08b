//! `[sources.openbao.dynamic.NAME]`: a secret whose value is built from the data of a lease
//! (dynamic credentials, e.g. OpenBao's database secrets engine), validated here; the lease
//! logic is in [`crate::openbao`].
//!
//! ```toml
//! [sources.openbao.dynamic.ORDERS_DB]
//! path = "database/creds/orders"
//! template = "postgresql://{{username}}:{{password}}@db.internal:5432/orders"
//! rotate_before = "5m"
//! revoke_grace = "60s"
//! revoke_on_shutdown = true
//! ```
//!
//! The template is parsed here (`{{KEY}}` placeholders, everything else literal); whether each
//! KEY exists is only known from the first lease, so an unknown key is reported then.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Doc, kv_segment_path};
use crate::name::SecretName;

/// Default `rotate_before`, as in the contract's example.
pub const DEFAULT_ROTATE_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Default `revoke_grace`, as in the contract's example.
pub const DEFAULT_REVOKE_GRACE: Duration = Duration::from_secs(60);

/// One dynamic secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicSecret {
    pub name: SecretName,
    /// The logical path whose read returns a lease (`database/creds/orders`), no leading `/`.
    pub path: String,
    pub template: Template,
    /// Fetch new credentials this long before the lease's max TTL.
    pub rotate_before: Duration,
    /// After a rotation, revoke the previous lease this much later.
    pub revoke_grace: Duration,
    /// SIGTERM/SIGINT revoke the lease this broker holds.
    pub revoke_on_shutdown: bool,
}

/// A parsed `template`: literal text and `{{KEY}}` placeholders. Not secret (it is in the
/// config file); the value built from it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Key(String),
}

impl Template {
    /// `{{KEY}}` with KEY of letters, digits, `_`, `-` or `.`; `{{ KEY }}` (spaces) is accepted.
    /// A `{{` that does not open a placeholder, or a `}}` outside one, is an error: a typo must
    /// not end up inside a connection string.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let open = rest.find("{{");
            let close = rest.find("}}");
            match (open, close) {
                (None, None) => {
                    parts.push(Part::Text(rest.to_owned()));
                    break;
                }
                (_, Some(c)) if open.is_none_or(|o| c < o) => {
                    return Err(format!(
                        "`}}}}` without an opening `{{{{` at byte {}",
                        s.len() - rest.len() + c
                    ));
                }
                (Some(o), _) => {
                    if o > 0 {
                        parts.push(Part::Text(rest[..o].to_owned()));
                    }
                    let after = &rest[o + 2..];
                    let end = after
                        .find("}}")
                        .ok_or_else(|| "`{{` without a closing `}}`".to_owned())?;
                    let key = after[..end].trim();
                    if key.is_empty()
                        || !key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                    {
                        return Err(format!(
                            "{{{{{}}}}} is not a placeholder: expected {{{{KEY}}}} with KEY of letters, digits, `_`, `-` or `.`",
                            &after[..end]
                        ));
                    }
                    parts.push(Part::Key(key.to_owned()));
                    rest = &after[end + 2..];
                }
                (None, Some(_)) => unreachable!("handled by the guard above"),
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Key(_))) {
            return Err(
                "has no {{KEY}} placeholder: the value would not come from the lease".to_owned(),
            );
        }
        Ok(Template { parts })
    }

    /// The placeholders, in order of appearance.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Key(k) => Some(k.as_str()),
            Part::Text(_) => None,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDynamic {
    path: Spanned<String>,
    template: Spanned<String>,
    rotate_before: Option<Spanned<String>>,
    revoke_grace: Option<Spanned<String>>,
    revoke_on_shutdown: Option<bool>,
}

pub(super) fn validate(
    doc: &Doc<'_>,
    section: &str,
    raw: BTreeMap<String, Spanned<RawDynamic>>,
) -> Result<Vec<DynamicSecret>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, entry) in raw {
        let at = format!("in [sources.{section}.dynamic.{name}]");
        let at = at.as_str();
        let name = SecretName::parse(&name).map_err(|e| {
            doc.err(
                &entry,
                "dynamic",
                &format!("in [sources.{section}]"),
                format!("{name:?} is not a valid secret name: {e}"),
            )
        })?;
        let entry = entry.into_inner();
        let path = entry.path.get_ref().as_str();
        kv_segment_path(path).map_err(|m| doc.err(&entry.path, "path", at, m))?;
        let template = Template::parse(entry.template.get_ref())
            .map_err(|m| doc.err(&entry.template, "template", at, m))?;
        let duration = |v: &Option<Spanned<String>>, key: &str, default: Duration| match v {
            None => Ok(default),
            Some(v) => humantime::parse_duration(v.get_ref()).map_err(|e| {
                doc.err(
                    v,
                    key,
                    at,
                    format!("expected a duration such as \"30s\" or \"5m\" ({e})"),
                )
            }),
        };
        out.push(DynamicSecret {
            name,
            path: path.to_owned(),
            template,
            rotate_before: duration(&entry.rotate_before, "rotate_before", DEFAULT_ROTATE_BEFORE)?,
            revoke_grace: duration(&entry.revoke_grace, "revoke_grace", DEFAULT_REVOKE_GRACE)?,
            revoke_on_shutdown: entry.revoke_on_shutdown.unwrap_or(true),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_into_text_and_keys() {
        let t = Template::parse("postgresql://{{username}}:{{ password }}@db:5432/orders").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Text("postgresql://".into()),
                Part::Key("username".into()),
                Part::Text(":".into()),
                Part::Key("password".into()),
                Part::Text("@db:5432/orders".into()),
            ]
        );
        assert_eq!(t.keys().collect::<Vec<_>>(), ["username", "password"]);
        assert_eq!(
            Template::parse("{{a}}").unwrap().parts,
            vec![Part::Key("a".into())]
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (t, want) in [
            (
                "postgresql://fixed",
                "has no {{KEY}} placeholder: the value would not come from the lease",
            ),
            ("x{{username", "`{{` without a closing `}}`"),
            ("x}}{{a}}", "`}}` without an opening `{{` at byte 1"),
            (
                "{{}}",
                "{{}} is not a placeholder: expected {{KEY}} with KEY of letters, digits, `_`, `-` or `.`",
            ),
            (
                "{{a b}}",
                "{{a b}} is not a placeholder: expected {{KEY}} with KEY of letters, digits, `_`, `-` or `.`",
            ),
        ] {
            assert_eq!(Template::parse(t).unwrap_err(), want, "{t}");
        }
    }
}
