//! containerd's filter syntax, as `ctr snapshots ls` and containerd's own lookups send
//! it with Walk (List): `<fieldpath>[<op><value>]` selectors joined by `,` (all must
//! match); a snapshot is listed when any one filter string matches. Field path parts
//! may be quoted (`labels."containerd.io/gc.root"`), values too (`"…"`, `/…/`, `|…|`).
//! Ops: `==`, `!=`, `~=` (regular expression); no op means the field is present.

use std::collections::BTreeMap;

/// What a selector can look at: a snapshot's fields by containerd's names.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields<'_> {
    /// The value at `path`, None where there is no such field (an empty parent counts
    /// as absent, as containerd's adaptor has it).
    fn get(&self, path: &[String]) -> Option<&str> {
        fn nonempty(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        match path {
            [field] => match field.as_str() {
                "name" => nonempty(self.name),
                "parent" => nonempty(self.parent),
                "kind" => nonempty(self.kind),
                _ => None,
            },
            [labels, rest @ ..] if labels == "labels" && !rest.is_empty() => {
                self.labels.get(&rest.join(".")).map(String::as_str)
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex_lite::Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, fields: &Fields) -> bool {
        let value = fields.get(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value.unwrap_or("") == want,
            Op::NotEqual(want) => value.unwrap_or("") != want,
            Op::Matches(re) => value.is_some_and(|v| re.is_match(v)),
        }
    }
}

/// Filter strings, any of which may match; none means everything matches.
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses every filter string; an invalid one is an error naming it.
    pub fn parse(filters: &[String]) -> Result<Filters, String> {
        let any = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| parse_filter(f).map_err(|e| format!("filter {f:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Filters { any })
    }

    pub fn matches(&self, fields: &Fields) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(fields)))
    }
}

/// A cursor over one filter string.
struct Scanner<'a> {
    rest: &'a str,
}

impl Scanner<'_> {
    fn skip_spaces(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn eat(&mut self, prefix: &str) -> bool {
        match self.rest.strip_prefix(prefix) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    /// A run of characters while `keep` holds.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let end = self.rest.find(|c| !keep(c)).unwrap_or(self.rest.len());
        let (taken, rest) = self.rest.split_at(end);
        self.rest = rest;
        taken.to_owned()
    }

    /// A quoted string starting at the current quote character: `"…"` with Go's
    /// escapes, or `/…/` and `|…|` (for regular expressions) with `\<quote>` only.
    fn quoted(&mut self) -> Result<String, String> {
        let quote = self.peek().ok_or("expected a quote")?;
        let mut out = String::new();
        let mut chars = self.rest[quote.len_utf8()..].char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.rest = &self.rest[quote.len_utf8() + i + c.len_utf8()..];
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let (_, escaped) = chars.next().ok_or("unterminated quote")?;
            let unescaped = match (quote, escaped) {
                ('"', 'n') => '\n',
                ('"', 't') => '\t',
                ('"', 'r') => '\r',
                ('"', '\\') => '\\',
                (_, c) if c == quote => c,
                (_, c) => {
                    // Kept as written: a regular expression's own escape.
                    out.push('\\');
                    c
                }
            };
            out.push(unescaped);
        }
        Err("unterminated quote".into())
    }
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn parse_filter(filter: &str) -> Result<Vec<Selector>, String> {
    let mut scan = Scanner { rest: filter };
    let mut selectors = Vec::new();
    loop {
        selectors.push(parse_selector(&mut scan)?);
        scan.skip_spaces();
        if scan.rest.is_empty() {
            return Ok(selectors);
        }
        if !scan.eat(",") {
            return Err(format!("unexpected {:?}", scan.rest));
        }
    }
}

fn parse_selector(scan: &mut Scanner) -> Result<Selector, String> {
    let mut path = Vec::new();
    loop {
        scan.skip_spaces();
        let part = match scan.peek() {
            Some(c) if is_quote(c) => scan.quoted()?,
            _ => scan.take_while(|c| c == '_' || c.is_ascii_alphanumeric()),
        };
        if part.is_empty() {
            return Err("expected a field name".into());
        }
        path.push(part);
        if !scan.eat(".") {
            break;
        }
    }
    scan.skip_spaces();
    let op = if scan.eat("==") {
        Op::Equal(parse_value(scan)?)
    } else if scan.eat("!=") {
        Op::NotEqual(parse_value(scan)?)
    } else if scan.eat("~=") {
        let pattern = parse_value(scan)?;
        Op::Matches(regex_lite::Regex::new(&pattern).map_err(|e| e.to_string())?)
    } else {
        Op::Present
    };
    Ok(Selector { path, op })
}

fn parse_value(scan: &mut Scanner) -> Result<String, String> {
    scan.skip_spaces();
    match scan.peek() {
        Some(c) if is_quote(c) => scan.quoted(),
        _ => {
            let value = scan.take_while(|c| c != ',' && !c.is_whitespace());
            if value.is_empty() {
                return Err("expected a value".into());
            }
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(
        name: &'a str,
        parent: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> Fields<'a> {
        Fields {
            name,
            parent,
            kind: "committed",
            labels,
        }
    }

    fn matches(filters: &[&str], f: &Fields) -> bool {
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&filters).unwrap().matches(f)
    }

    #[test]
    fn containerd_lookups() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/snapshot.ref".into(), "sha256:abc".into());
        labels.insert("l".into(), "2".into());
        let f = fields("ns/1/x", "ns/0/p", &labels);
        // What containerd's metadata store sends after an AlreadyExists.
        assert!(matches(
            &[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/0/p""#],
            &f
        ));
        assert!(!matches(
            &[r##"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""##],
            &f
        ));
        assert!(matches(&["labels.l"], &f));
        assert!(matches(&["labels.l==2", "name==nope"], &f));
        assert!(!matches(&["labels.m"], &f));
        assert!(matches(&["kind==committed,labels.l~=^[0-9]$"], &f));
        assert!(matches(&["name~=/^ns\\/1/"], &f));
        assert!(matches(&[r##"parent!="""##], &f));
        let root = fields("r", "", &labels);
        assert!(!matches(&[r##"parent!="""##], &root));
        assert!(!matches(&["parent"], &root));
        assert!(matches(&[], &root));
    }

    #[test]
    fn invalid_filters_are_errors() {
        for bad in ["==x", "name==", "name=x", r#"labels."open"#, "name==a b"] {
            assert!(Filters::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
