//! Policy decisions against a naive oracle (differential). The bytes describe up to 20 scopes
//! (so grants large enough for the prefix index are common), a caller and a few names; the
//! broker's `evaluate` must give exactly what a plain reading of the rules gives: the first
//! scope in config order whose matcher holds every fact and one of whose patterns covers the
//! name, where `*` and `?` stay within a segment and a whole-segment `**` spans segments
//! (trailing: at least one; leading or inside: any number, zero included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use secretd::{
    name::SecretName,
    policy::{Caller, Decision, DenyReason, Matcher, Policy, Scope, evaluate},
};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

const FUNCTIONS: [&str; 2] = ["orders", "billing"];

fn segment(b: &mut Bytes<'_>, alphabet: &[u8]) -> String {
    let mut s = String::new();
    for _ in 0..1 + b.next() % 3 {
        let c = alphabet[usize::from(b.next()) % alphabet.len()];
        if c == b'*' && s.ends_with('*') {
            continue; // `**` inside a segment is not part of the documented syntax
        }
        s.push(char::from(c));
    }
    s
}

fn pattern(b: &mut Bytes<'_>) -> String {
    let mut segs: Vec<String> = Vec::new();
    for _ in 0..1 + b.next() % 3 {
        if b.next() % 5 == 0 && segs.last().is_none_or(|s| s != "**") {
            segs.push("**".into());
        } else {
            segs.push(segment(b, b"ab*?"));
        }
    }
    segs.join("/")
}

fn name(b: &mut Bytes<'_>) -> String {
    (0..1 + b.next() % 3)
        .map(|_| segment(b, b"ab"))
        .collect::<Vec<_>>()
        .join("/")
}

fn matcher(b: &mut Bytes<'_>) -> Matcher {
    let bits = b.next();
    let mut m = Matcher {
        uid: (bits & 1 != 0).then(|| u32::from(b.next() % 4)),
        gid: (bits & 2 != 0).then(|| u32::from(b.next() % 4)),
        function: (bits & 4 != 0).then(|| FUNCTIONS[usize::from(b.next() % 2)].to_owned()),
        exe: None,
    };
    if m.is_empty() {
        m.uid = Some(u32::from(b.next() % 4));
    }
    m
}

/// `*` = any run of characters, `?` = exactly one, within one segment.
fn segment_matches(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|k| segment_matches(rest, &s[k..])),
        Some((b'?', rest)) => !s.is_empty() && segment_matches(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && segment_matches(rest, &s[1..]),
    }
}

fn glob(p: &[&str], n: &[&str]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((&"**", [])) => !n.is_empty(),
        Some((&"**", rest)) => (0..=n.len()).any(|k| glob(rest, &n[k..])),
        Some((seg, rest)) => {
            !n.is_empty() && segment_matches(seg.as_bytes(), n[0].as_bytes()) && glob(rest, &n[1..])
        }
    }
}

fn covers(patterns: &[String], name: &str) -> bool {
    let n: Vec<&str> = name.split('/').collect();
    patterns.iter().any(|p| glob(&p.split('/').collect::<Vec<_>>(), &n))
}

fn holds(m: &Matcher, c: &Caller) -> bool {
    m.uid.is_none_or(|u| u == c.uid)
        && m.gid.is_none_or(|g| g == c.gid || c.groups.contains(&g))
        && m.function.as_ref().is_none_or(|f| c.function.as_ref() == Some(f))
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mut scopes = Vec::new();
    let mut plain: Vec<(String, Matcher, Vec<String>)> = Vec::new();
    for i in 0..1 + b.next() % 20 {
        let m = matcher(&mut b);
        let patterns: Vec<String> = (0..1 + b.next() % 3).map(|_| pattern(&mut b)).collect();
        let scope = Scope::new(format!("s{i}"), m.clone(), patterns.clone()).unwrap();
        scopes.push(scope);
        plain.push((format!("s{i}"), m, patterns));
    }
    let policy = Policy::new(scopes);
    let caller = Caller {
        pid: 1,
        uid: u32::from(b.next() % 4),
        gid: u32::from(b.next() % 4),
        groups: (0..b.next() % 3).map(|_| u32::from(b.next() % 4)).collect(),
        function: (b.next() % 2 == 0).then(|| FUNCTIONS[usize::from(b.next() % 2)].to_owned()),
        exe: None,
    };
    let grant = policy.grant(&caller);
    for _ in 0..4 {
        let n = name(&mut b);
        let secret = SecretName::parse(&n).unwrap();
        let matched: Vec<&(String, Matcher, Vec<String>)> =
            plain.iter().filter(|(_, m, _)| holds(m, &caller)).collect();
        let want = match matched.iter().find(|(_, _, p)| covers(p, &n)) {
            Some((scope, _, _)) => Decision::Allow {
                scope: scope.clone(),
            },
            None if matched.is_empty() => Decision::Deny(DenyReason::NoMatchingScope),
            None => Decision::Deny(DenyReason::NotCovered),
        };
        let got = evaluate(&policy, &grant, &secret);
        assert_eq!(got, want, "name {n:?}, caller {caller:?}, policy {plain:?}");
        assert_eq!(
            grant.allows(&policy, &secret),
            matches!(want, Decision::Allow { .. })
        );
    }
});
