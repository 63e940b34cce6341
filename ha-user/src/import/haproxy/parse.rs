//! haproxy.cfg as sections of tokenized lines: just enough of haproxy's own
//! syntax (sections, `#` comments, quotes, backslash escapes) to read the
//! directives `ha-user import` translates, with the line of each so a
//! directive left behind can be named.

/// One configuration line, split into words as haproxy splits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub number: usize,
    pub words: Vec<String>,
}

impl Line {
    pub fn text(&self) -> String {
        self.words.join(" ")
    }

    pub fn word(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// `global`, `defaults`, `frontend`, `backend`, `listen`, ...
    pub kind: String,
    pub name: Option<String>,
    pub header: Line,
    pub lines: Vec<Line>,
}

/// Keywords that open a section in haproxy 2.x/3.x.
const SECTION_KEYWORDS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "resolvers",
    "peers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "crt-store",
    "traces",
    "log-forward",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: unterminated quote")]
    UnterminatedQuote { line: usize },
    #[error("line {line}: `{text}` comes before any section")]
    OutsideSection { line: usize, text: String },
}

/// Splits one line into words: whitespace separates, `#` starts a comment,
/// quotes group (double quotes and single quotes), backslash escapes.
fn words(line: &str, number: usize) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
                in_word = true;
            }
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(ParseError::UnterminatedQuote { line: number });
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

pub fn parse(text: &str) -> Result<Vec<Section>, ParseError> {
    let mut sections: Vec<Section> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let words = words(raw, number)?;
        let Some(first) = words.first().cloned() else {
            continue;
        };
        let line = Line { number, words };
        if SECTION_KEYWORDS.contains(&first.as_str()) {
            sections.push(Section {
                kind: first,
                name: line.word(1).map(str::to_string),
                header: line,
                lines: Vec::new(),
            });
        } else if let Some(section) = sections.last_mut() {
            section.lines.push(line);
        } else {
            return Err(ParseError::OutsideSection {
                line: number,
                text: line.text(),
            });
        }
    }
    Ok(sections)
}

/// haproxy's time format: a number with an optional unit, milliseconds by default.
pub fn duration(text: &str) -> Option<std::time::Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let micros = match unit {
        "us" => 1,
        "" | "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return None,
    };
    Some(std::time::Duration::from_micros(
        number.checked_mul(micros)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn words_follow_haproxy_quoting() {
        assert_eq!(
            words(r#"  http-check expect string "health":"true"  # etcd"#, 1).unwrap(),
            ["http-check", "expect", "string", "health:true"]
        );
        assert_eq!(
            words(r#"http-check expect string \"health\":\"true\""#, 1).unwrap(),
            ["http-check", "expect", "string", r#""health":"true""#]
        );
        assert_eq!(
            words("option httpchk 'GET' /healthz", 1).unwrap(),
            ["option", "httpchk", "GET", "/healthz"]
        );
        assert_eq!(
            words("bind \"", 3),
            Err(ParseError::UnterminatedQuote { line: 3 })
        );
    }

    #[test]
    fn sections_collect_their_lines() {
        let sections =
            parse("# top\nglobal\n  daemon\n\nfrontend api\n  bind *:6443\nbackend b\n").unwrap();
        assert_eq!(sections.len(), 3);
        assert_eq!(sections[1].kind, "frontend");
        assert_eq!(sections[1].name.as_deref(), Some("api"));
        assert_eq!(sections[1].lines[0].number, 6);
        assert_eq!(
            parse("  daemon\nglobal\n"),
            Err(ParseError::OutsideSection {
                line: 1,
                text: "daemon".into()
            })
        );
    }

    #[test]
    fn durations_default_to_milliseconds() {
        assert_eq!(duration("2000"), Some(Duration::from_secs(2)));
        assert_eq!(duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(duration("fast"), None);
    }
}
