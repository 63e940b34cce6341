//! keepalived.conf as a tree of statements: words, `{ ... }` blocks, `!` and
//! `#` comments, double quotes. Each statement keeps its line so that a
//! directive left behind by `ha-user import` can be named.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub line: usize,
    pub words: Vec<String>,
    /// The `{ ... }` block that follows the words, if any.
    pub block: Option<Vec<Statement>>,
}

impl Statement {
    pub fn keyword(&self) -> &str {
        self.words.first().map(String::as_str).unwrap_or("")
    }

    pub fn word(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(String::as_str)
    }

    pub fn text(&self) -> String {
        let mut text = self.words.join(" ");
        if self.block.is_some() {
            text.push_str(" { ... }");
        }
        text
    }

    pub fn children(&self) -> &[Statement] {
        self.block.as_deref().unwrap_or(&[])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: unterminated quote")]
    UnterminatedQuote { line: usize },
    #[error("line {line}: `}}` closes no block")]
    UnbalancedClose { line: usize },
    #[error("the block opened on line {line} is never closed")]
    Unclosed { line: usize },
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Open,
    Close,
    EndOfLine,
}

fn tokens(text: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let mut chars = raw.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                '!' | '#' => break,
                '{' => {
                    chars.next();
                    out.push((line, Token::Open));
                }
                '}' => {
                    chars.next();
                    out.push((line, Token::Close));
                }
                '"' => {
                    chars.next();
                    let mut word = String::new();
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some(c) => word.push(c),
                            None => return Err(ParseError::UnterminatedQuote { line }),
                        }
                    }
                    out.push((line, Token::Word(word)));
                }
                c if c.is_whitespace() => {
                    chars.next();
                }
                _ => {
                    let mut word = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || matches!(c, '{' | '}' | '"' | '!' | '#') {
                            break;
                        }
                        word.push(c);
                        chars.next();
                    }
                    out.push((line, Token::Word(word)));
                }
            }
        }
        out.push((line, Token::EndOfLine));
    }
    Ok(out)
}

pub fn parse(text: &str) -> Result<Vec<Statement>, ParseError> {
    let tokens = tokens(text)?;
    let mut position = 0;
    let statements = block(&tokens, &mut position, None)?;
    Ok(statements)
}

/// Statements until the `}` that closes the block opened on `opened` (or the end).
fn block(
    tokens: &[(usize, Token)],
    position: &mut usize,
    opened: Option<usize>,
) -> Result<Vec<Statement>, ParseError> {
    let mut statements = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut start = 0;
    let flush = |words: &mut Vec<String>, statements: &mut Vec<Statement>, start: usize| {
        if !words.is_empty() {
            statements.push(Statement {
                line: start,
                words: std::mem::take(words),
                block: None,
            });
        }
    };
    while let Some((line, token)) = tokens.get(*position) {
        *position += 1;
        match token {
            Token::Word(word) => {
                if words.is_empty() {
                    start = *line;
                }
                words.push(word.clone());
            }
            Token::EndOfLine => flush(&mut words, &mut statements, start),
            Token::Open => {
                let line_of_open = if words.is_empty() { *line } else { start };
                let children = block(tokens, position, Some(*line))?;
                statements.push(Statement {
                    line: line_of_open,
                    words: std::mem::take(&mut words),
                    block: Some(children),
                });
            }
            Token::Close => {
                flush(&mut words, &mut statements, start);
                return match opened {
                    Some(_) => Ok(statements),
                    None => Err(ParseError::UnbalancedClose { line: *line }),
                };
            }
        }
    }
    flush(&mut words, &mut statements, start);
    match opened {
        Some(line) => Err(ParseError::Unclosed { line }),
        None => Ok(statements),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_nest_and_comments_vanish() {
        let text = "! comment\nglobal_defs {\n  router_id LVS_DEVEL # id\n}\nvrrp_instance VI_1 {\n  unicast_peer { 10.0.0.2\n 10.0.0.3 }\n  virtual_ipaddress {\n    10.0.0.100/24 dev eth0\n  }\n}\n";
        let tree = parse(text).unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree[0].children()[0].words, ["router_id", "LVS_DEVEL"]);
        let instance = &tree[1];
        assert_eq!(instance.words, ["vrrp_instance", "VI_1"]);
        assert_eq!(instance.line, 5);
        let peers = &instance.children()[0];
        assert_eq!(peers.keyword(), "unicast_peer");
        let addresses: Vec<&str> = peers.children().iter().map(|s| s.keyword()).collect();
        assert_eq!(addresses, ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(
            instance.children()[1].children()[0].words,
            ["10.0.0.100/24", "dev", "eth0"]
        );
    }

    #[test]
    fn quotes_group_words() {
        let tree = parse("vrrp_script chk {\n script \"/bin/check --fast\"\n}\n").unwrap();
        assert_eq!(tree[0].children()[0].words, ["script", "/bin/check --fast"]);
    }

    #[test]
    fn unbalanced_braces_are_errors() {
        assert_eq!(parse("a {\n b\n"), Err(ParseError::Unclosed { line: 1 }));
        assert_eq!(parse("}\n"), Err(ParseError::UnbalancedClose { line: 1 }));
        assert_eq!(
            parse("a \"b\n"),
            Err(ParseError::UnterminatedQuote { line: 1 })
        );
    }
}
