//! Who may read what: a pure function of plain data (no I/O, no clock, no logging).
//!
//! A [`Policy`] is a list of [`Scope`]s. A scope has a [`Matcher`] (facts about the caller that
//! must all hold) and secret-name patterns. A caller is granted the union of every scope it
//! matches; a name is allowed when one of those scopes covers it.
//!
//! Trust: the [`Caller`] must come from the kernel (`SO_PEERCRED`, `/proc/<pid>`) and from
//! worker registrations, never from anything the client sent; building it is `peer.rs`'s job.
//! Failing closed is built in: an empty matcher matches nobody, an unknown `exe` or `function`
//! never equals a configured one, and a stale [`Grant`] index grants nothing.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::name::SecretName;

/// Who is calling, as the kernel and /proc said (built by `peer.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups from `/proc/<pid>/status`.
    pub groups: Vec<u32>,
    /// From a worker registration (the caller's own, or an ancestor's under the same uid).
    pub function: Option<String>,
    /// `/proc/<pid>/exe`, when it could be read.
    pub exe: Option<PathBuf>,
}

/// Facts a caller must have to match a scope: every key that is `Some` must match (AND).
///
/// - `uid`: the peer's uid (a configured `user` is resolved to this at load time).
/// - `gid`: the peer's primary gid OR any of its supplementary groups (a `group` likewise).
/// - `function`: the name the caller (or its registered ancestor) was registered under.
/// - `exe`: exact path equality with `/proc/<pid>/exe` (which shows the resolved path, so a
///   symlink such as `/usr/bin/python3` never matches; configure the real file).
///
/// A matcher with no key matches no caller (config loading rejects such scopes anyway).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub function: Option<String>,
    pub exe: Option<PathBuf>,
}

/// `uid=1001 gid=500 function="billing" exe=/usr/bin/python3.11`, keys that are set only.
impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(uid) = self.uid {
            parts.push(format!("uid={uid}"));
        }
        if let Some(gid) = self.gid {
            parts.push(format!("gid={gid}"));
        }
        if let Some(function) = &self.function {
            parts.push(format!("function={function:?}"));
        }
        if let Some(exe) = &self.exe {
            parts.push(format!("exe={}", exe.display()));
        }
        f.write_str(&parts.join(" "))
    }
}

impl Matcher {
    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        self.uid.is_none() && self.gid.is_none() && self.function.is_none() && self.exe.is_none()
    }

    pub fn matches(&self, caller: &Caller) -> bool {
        if self.is_empty() {
            return false;
        }
        if self.uid.is_some_and(|uid| uid != caller.uid) {
            return false;
        }
        if let Some(gid) = self.gid
            && gid != caller.gid
            && !caller.groups.contains(&gid)
        {
            return false;
        }
        if let Some(function) = &self.function
            && caller.function.as_ref() != Some(function)
        {
            return false;
        }
        if let Some(exe) = &self.exe
            && caller.exe.as_ref() != Some(exe)
        {
            return false;
        }
        true
    }
}

/// A labelled grant: callers matching `matcher` may read names matching `patterns`.
///
/// Patterns are globs over whole names, matched case-sensitively, where `/` is special:
/// `*`, `?` and `[...]` never match a `/` (`apps/*` covers `apps/x` but not `apps/x/y`), while
/// `**` as a whole segment matches any number of segments: `apps/**` covers `apps/x` and
/// `apps/x/y` (not `apps` itself), `**/db` covers `db` and `a/b/db`, and `**` alone covers
/// every name. `{a,b}` alternation and `\` escapes work as usual.
#[derive(Clone)]
pub struct Scope {
    pub name: String,
    pub matcher: Matcher,
    pub patterns: Vec<String>,
    globs: GlobSet,
    description: Option<String>,
}

impl fmt::Debug for Scope {
    // The compiled GlobSet's Debug is pages of automaton internals; the patterns say it all.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("name", &self.name)
            .field("matcher", &self.matcher)
            .field("patterns", &self.patterns)
            .finish_non_exhaustive()
    }
}

impl Scope {
    pub fn new(
        name: String,
        matcher: Matcher,
        patterns: Vec<String>,
    ) -> Result<Scope, globset::Error> {
        let mut set = GlobSetBuilder::new();
        for pattern in &patterns {
            set.add(secret_glob(pattern)?);
        }
        Ok(Scope {
            name,
            matcher,
            patterns,
            globs: set.build()?,
            description: None,
        })
    }

    /// Record how the config wrote the matcher (e.g. `user=orders (uid 1001)`), for
    /// [`Scope::describe_matcher`]. Changes nothing about matching.
    pub fn with_description(mut self, description: String) -> Scope {
        self.description = Some(description);
        self
    }

    /// The matcher for humans: as the config wrote it when known, else from the ids.
    pub fn describe_matcher(&self) -> String {
        self.description
            .clone()
            .unwrap_or_else(|| self.matcher.to_string())
    }

    /// Whether one of this scope's patterns matches `name`.
    pub fn covers(&self, name: &SecretName) -> bool {
        self.globs.is_match(name.as_str())
    }

    /// Whether `caller` has every fact this scope's matcher asks for.
    pub fn matches(&self, caller: &Caller) -> bool {
        self.matcher.matches(caller)
    }
}

/// Compile one secret-name pattern with the semantics documented on [`Scope`].
pub fn secret_glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// The scopes in force, in config order, and an index that finds the few scopes whose patterns
/// could cover a name without trying every scope.
#[derive(Clone, Default)]
pub struct Policy {
    scopes: Vec<Scope>,
    index: PrefixIndex,
}

impl fmt::Debug for Policy {
    // The index is derived from the scopes; the scopes say it all.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Scopes by the literal prefix of their patterns (the bytes before the first `*?[{\`).
///
/// A glob can only match names that start with its literal prefix, so the scopes that might
/// cover a name are those filed under one of the name's prefixes; everything else is skipped
/// without running its matcher. The index only narrows the search: whether a candidate covers
/// the name is still [`Scope::covers`]. Only used for grants with more than
/// [`SCAN_AT_MOST`] scopes; smaller grants are scanned directly.
#[derive(Clone, Default)]
struct PrefixIndex {
    by_prefix: HashMap<Box<str>, Vec<usize>>,
    /// The distinct prefix lengths in `by_prefix`, ascending.
    lengths: Vec<usize>,
}

/// Grants with at most this many scopes try each scope in turn (cheaper than the index).
const SCAN_AT_MOST: usize = 8;

impl PrefixIndex {
    fn new(scopes: &[Scope]) -> PrefixIndex {
        let mut by_prefix: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        for (i, scope) in scopes.iter().enumerate() {
            for pattern in &scope.patterns {
                let end = pattern
                    .find(['*', '?', '[', '{', '\\'])
                    .unwrap_or(pattern.len());
                let list = by_prefix.entry(pattern[..end].into()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        let mut lengths: Vec<usize> = by_prefix.keys().map(|k| k.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        PrefixIndex { by_prefix, lengths }
    }

    /// Scopes (ascending, deduplicated, granted only) whose patterns might cover `name`.
    fn candidates(&self, name: &str, grant: &Grant) -> Vec<usize> {
        let mut out = Vec::new();
        for &len in &self.lengths {
            let Some(prefix) = name.get(..len) else { break };
            if let Some(scopes) = self.by_prefix.get(prefix) {
                out.extend(scopes.iter().copied().filter(|&i| grant.contains(i)));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl Policy {
    pub fn new(scopes: Vec<Scope>) -> Policy {
        let index = PrefixIndex::new(&scopes);
        Policy { scopes, index }
    }

    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// The function names the scopes match on (`function = "…"`), sorted, each once.
    pub fn functions(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .scopes
            .iter()
            .filter_map(|s| s.matcher.function.as_deref())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Indices of the scopes this caller matches (computed once per connection and reused),
    /// with their names (shared by every audit record made with this grant).
    ///
    /// A grant is only meaningful with the policy that made it: after a reload, compute it
    /// again.
    pub fn grant(&self, caller: &Caller) -> Grant {
        let (scopes, names): (Vec<usize>, Vec<String>) = self
            .scopes
            .iter()
            .enumerate()
            .filter(|(_, scope)| scope.matches(caller))
            .map(|(i, scope)| (i, scope.name.clone()))
            .unzip();
        Grant {
            scopes: scopes.into(),
            names: names.into(),
        }
    }

    /// The first scope in config order that is in `grant` and covers `name`.
    fn first_covering(&self, grant: &Grant, name: &SecretName) -> Option<&Scope> {
        if grant.scopes.len() <= SCAN_AT_MOST {
            return grant.resolve(self).find(|s| s.covers(name));
        }
        self.index
            .candidates(name.as_str(), grant)
            .into_iter()
            .filter_map(|i| self.scopes.get(i))
            .find(|s| s.covers(name))
    }
}

/// The scopes a caller matched, as indices into the [`Policy`] that computed it (ascending),
/// and their names. Cloning is cheap: a grant is cloned on every call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    scopes: Arc<[usize]>,
    names: Arc<[String]>,
}

impl Grant {
    /// Names of the matched scopes, in config order, as `policy` has them.
    pub fn scope_names<'p>(&self, policy: &'p Policy) -> Vec<&'p str> {
        self.resolve(policy).map(|s| s.name.as_str()).collect()
    }

    /// Names of the matched scopes as the policy that made this grant had them, shared (no
    /// copy per call): what audit records list.
    pub fn shared_names(&self) -> Arc<[String]> {
        Arc::clone(&self.names)
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// Indices into [`Policy::scopes`].
    pub fn indices(&self) -> &[usize] {
        &self.scopes
    }

    fn contains(&self, scope: usize) -> bool {
        self.scopes.binary_search(&scope).is_ok()
    }

    /// Whether `name` is allowed: `evaluate(..)` is `Allow`.
    pub fn allows(&self, policy: &Policy, name: &SecretName) -> bool {
        policy.first_covering(self, name).is_some()
    }

    fn resolve<'p>(&self, policy: &'p Policy) -> impl Iterator<Item = &'p Scope> {
        self.scopes.iter().filter_map(|&i| policy.scopes.get(i))
    }
}

/// The answer to "may this caller read this name?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `scope` (the first matched scope, in config order, that covers the name).
    Allow {
        scope: String,
    },
    Deny(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    NoMatchingScope,
    NotCovered,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NoMatchingScope => "caller matches no scope",
            DenyReason::NotCovered => "no matched scope covers the name",
        })
    }
}

/// The whole policy question in one call.
pub fn evaluate(policy: &Policy, grant: &Grant, name: &SecretName) -> Decision {
    if let Some(scope) = policy.first_covering(grant, name) {
        return Decision::Allow {
            scope: scope.name.clone(),
        };
    }
    // Indices are ascending: the first says whether any of them is a scope of this policy.
    let matched = grant
        .scopes
        .first()
        .is_some_and(|&i| i < policy.scopes.len());
    Decision::Deny(if matched {
        DenyReason::NotCovered
    } else {
        DenyReason::NoMatchingScope
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(name: &str, matcher: Matcher, patterns: &[&str]) -> Scope {
        Scope::new(
            name.to_owned(),
            matcher,
            patterns.iter().map(|p| (*p).to_owned()).collect(),
        )
        .unwrap()
    }

    fn policy() -> Policy {
        Policy::new(vec![
            scope(
                "orders",
                Matcher {
                    uid: Some(1001),
                    ..Matcher::default()
                },
                &["ORDERS_DB", "SHARED_*"],
            ),
            scope(
                "functions",
                Matcher {
                    gid: Some(500),
                    ..Matcher::default()
                },
                &["SHARED_CACHE", "apps/*"],
            ),
            scope(
                "billing-fn",
                Matcher {
                    uid: Some(1002),
                    function: Some("billing".into()),
                    ..Matcher::default()
                },
                &["BILLING_*", "apps/billing/**"],
            ),
            scope(
                "python",
                Matcher {
                    exe: Some("/usr/bin/python3.11".into()),
                    ..Matcher::default()
                },
                &["PY_?", "tls/{cert,key}"],
            ),
            scope("nobody", Matcher::default(), &["**"]),
        ])
    }

    fn caller(
        uid: u32,
        gid: u32,
        groups: &[u32],
        function: Option<&str>,
        exe: Option<&str>,
    ) -> Caller {
        Caller {
            pid: 42,
            uid,
            gid,
            groups: groups.to_vec(),
            function: function.map(str::to_owned),
            exe: exe.map(PathBuf::from),
        }
    }

    fn allow(scope: &str) -> Decision {
        Decision::Allow {
            scope: scope.to_owned(),
        }
    }
    const NO_SCOPE: Decision = Decision::Deny(DenyReason::NoMatchingScope);
    const NOT_COVERED: Decision = Decision::Deny(DenyReason::NotCovered);

    #[test]
    fn decisions() {
        let policy = policy();
        let plain = |uid| caller(uid, uid, &[], None, None);
        #[rustfmt::skip]
        let rows: Vec<(&str, Caller, &str, Decision)> = vec![
            ("uid matches, literal pattern", plain(1001), "ORDERS_DB", allow("orders")),
            ("uid matches, glob pattern", plain(1001), "SHARED_X", allow("orders")),
            ("uid matches, name not covered", plain(1001), "BILLING_DB", NOT_COVERED),
            ("patterns are case-sensitive", plain(1001), "orders_db", NOT_COVERED),
            ("pattern must match the whole name", plain(1001), "ORDERS_DB2", NOT_COVERED),
            ("other uid matches nothing", plain(1003), "ORDERS_DB", NO_SCOPE),
            ("root is not special", plain(0), "ORDERS_DB", NO_SCOPE),
            ("gid: primary group", caller(7, 500, &[], None, None), "SHARED_CACHE", allow("functions")),
            ("gid: supplementary group", caller(7, 7, &[4, 500], None, None), "SHARED_CACHE", allow("functions")),
            ("gid: neither", caller(7, 7, &[4, 501], None, None), "SHARED_CACHE", NO_SCOPE),
            ("scopes are unioned", caller(1001, 500, &[], None, None), "apps/x", allow("functions")),
            ("union: first covering scope in config order", caller(1001, 500, &[], None, None), "SHARED_CACHE", allow("orders")),
            ("* does not cross /", caller(7, 500, &[], None, None), "apps/x/y", NOT_COVERED),
            ("* needs the prefix segment", caller(7, 500, &[], None, None), "apps", NOT_COVERED),
            ("AND: uid and function both match", caller(1002, 1002, &[], Some("billing"), None), "BILLING_DB", allow("billing-fn")),
            ("AND: uid without function", plain(1002), "BILLING_DB", NO_SCOPE),
            ("AND: function under another uid", caller(1003, 1003, &[], Some("billing"), None), "BILLING_DB", NO_SCOPE),
            ("AND: other function", caller(1002, 1002, &[], Some("orders"), None), "BILLING_DB", NO_SCOPE),
            ("** crosses /", caller(1002, 1002, &[], Some("billing"), None), "apps/billing/a/b", allow("billing-fn")),
            ("** one level", caller(1002, 1002, &[], Some("billing"), None), "apps/billing/a", allow("billing-fn")),
            ("** stays under its prefix", caller(1002, 1002, &[], Some("billing"), None), "apps/orders/a", NOT_COVERED),
            ("prefix/** is not the prefix", caller(1002, 1002, &[], Some("billing"), None), "apps/billing", NOT_COVERED),
            ("exe: exact path", caller(9, 9, &[], None, Some("/usr/bin/python3.11")), "PY_A", allow("python")),
            ("exe: ? is one byte", caller(9, 9, &[], None, Some("/usr/bin/python3.11")), "PY_AB", NOT_COVERED),
            ("exe: alternation", caller(9, 9, &[], None, Some("/usr/bin/python3.11")), "tls/key", allow("python")),
            ("exe: other path", caller(9, 9, &[], None, Some("/usr/bin/python3")), "PY_A", NO_SCOPE),
            ("exe: deleted binary", caller(9, 9, &[], None, Some("/usr/bin/python3.11 (deleted)")), "PY_A", NO_SCOPE),
            ("exe: unknown", caller(9, 9, &[], None, None), "PY_A", NO_SCOPE),
            ("empty matcher matches nobody", Caller::default(), "anything", NO_SCOPE),
        ];
        for (what, caller, name, want) in rows {
            let grant = policy.grant(&caller);
            let name = SecretName::parse(name).unwrap();
            assert_eq!(evaluate(&policy, &grant, &name), want, "{what}");
            assert_eq!(
                grant.allows(&policy, &name),
                matches!(want, Decision::Allow { .. }),
                "{what}"
            );
        }
    }

    #[test]
    fn grant_names_and_staleness() {
        let policy = policy();
        let grant = policy.grant(&caller(1001, 500, &[], None, None));
        assert_eq!(grant.scope_names(&policy), ["orders", "functions"]);
        assert_eq!(grant.indices(), [0, 1]);
        assert!(!grant.is_empty());
        assert!(policy.grant(&caller(3, 3, &[], None, None)).is_empty());

        // A grant from an old policy applied to a smaller one grants only what still exists.
        let smaller = Policy::new(vec![]);
        assert!(grant.scope_names(&smaller).is_empty());
        let name = SecretName::parse("ORDERS_DB").unwrap();
        assert_eq!(evaluate(&smaller, &grant, &name), NO_SCOPE);
        assert_eq!(
            evaluate(&Policy::default(), &Grant::default(), &name),
            NO_SCOPE
        );
    }

    #[test]
    fn index_agrees_with_trying_every_scope() {
        // Enough scopes that grants use the prefix index, with every kind of pattern.
        let shapes: &[&[&str]] = &[
            &["team_*", "apps/team/**"],
            &["ORDERS_DB"],
            &["**/db"],
            &["*"],
            &["apps/*"],
            &["apps/{a,b}/x"],
            &["lit\\*eral"],
            &["P?_X", "[AB]_KEY"],
            &["apps/team/**"],
            &["te"],
            &["team_DB"],
            &["{x,team}_*"],
        ];
        let mut scopes = Vec::new();
        for round in 0..3 {
            for (i, patterns) in shapes.iter().enumerate() {
                let uid = if (i + round) % 4 == 0 { 2 } else { 1 };
                scopes.push(scope(
                    &format!("s{round}-{i}"),
                    Matcher {
                        uid: Some(uid),
                        ..Matcher::default()
                    },
                    patterns,
                ));
            }
        }
        let policy = Policy::new(scopes);
        let names = "team_DB team te apps/team/x/y apps/a/x apps/c/x apps/x db a/b/db ORDERS_DB \
                     lit.eral literal P1_X A_KEY C_KEY x_Y zzz apps";
        for uid in [1, 2, 3] {
            let caller = caller(uid, uid, &[], None, None);
            let grant = policy.grant(&caller);
            assert!(grant.indices().len() > SCAN_AT_MOST || uid == 3);
            for name in names.split_whitespace() {
                let name = SecretName::parse(name).unwrap();
                let expected = policy
                    .scopes()
                    .iter()
                    .find(|s| s.matches(&caller) && s.covers(&name))
                    .map(|s| s.name.clone());
                let got = match evaluate(&policy, &grant, &name) {
                    Decision::Allow { scope } => Some(scope),
                    Decision::Deny(_) => None,
                };
                assert_eq!(got, expected, "uid {uid}, name {name}");
                assert_eq!(grant.allows(&policy, &name), expected.is_some());
            }
        }
        let grant = policy.grant(&caller(1, 1, &[], None, None));
        assert_eq!(*grant.shared_names(), *grant.scope_names(&policy));
    }

    #[test]
    fn deny_reasons_read_well() {
        assert_eq!(
            DenyReason::NoMatchingScope.to_string(),
            "caller matches no scope"
        );
        assert_eq!(
            DenyReason::NotCovered.to_string(),
            "no matched scope covers the name"
        );
    }

    #[test]
    fn debug_is_short() {
        let debug = format!("{:?}", policy().scopes()[0]);
        assert_eq!(
            debug,
            r#"Scope { name: "orders", matcher: Matcher { uid: Some(1001), gid: None, function: None, exe: None }, patterns: ["ORDERS_DB", "SHARED_*"], .. }"#
        );
    }

    #[test]
    fn matcher_descriptions() {
        let scopes = policy();
        assert_eq!(scopes.scopes()[0].describe_matcher(), "uid=1001");
        assert_eq!(
            scopes.scopes()[2].describe_matcher(),
            r#"uid=1002 function="billing""#
        );
        assert_eq!(scopes.scopes()[4].describe_matcher(), "");
        let described = scopes.scopes()[0]
            .clone()
            .with_description("user=orders (uid 1001)".into());
        assert_eq!(described.describe_matcher(), "user=orders (uid 1001)");
    }

    #[test]
    fn bad_glob_is_an_error() {
        let err = Scope::new("x".into(), Matcher::default(), vec!["a[".into()]).unwrap_err();
        assert!(
            err.to_string().contains("unclosed character class"),
            "{err}"
        );
    }
}
