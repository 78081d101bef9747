//! The IR text's tokens: names, numbers, punctuation, each with where it starts.

use crate::ParseError;

/// One token of the IR text.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Token {
    Ident(String),
    Value(String),
    Const(String),
    Number(String),
    Punct(char),
    End,
}

impl Token {
    pub(super) fn describe(&self) -> String {
        match self {
            Token::Ident(s) => format!("`{s}`"),
            Token::Value(s) => format!("`%{s}`"),
            Token::Const(s) => format!("`@{s}`"),
            Token::Number(s) => format!("number `{s}`"),
            Token::Punct(c) => format!("`{c}`"),
            Token::End => "end of input".into(),
        }
    }
}

/// The tokens of a text (each with its line and column) and the next one to read.
pub(super) struct Lexer {
    pub(super) tokens: Vec<(Token, usize, usize)>,
    pub(super) position: usize,
}

/// Whether `c` may appear in a name after its first character.
pub(super) fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '#' | '-')
}

/// The tokens of `text`, each with its line and column (1-based), or the
/// error at the first character that starts none.
pub(super) fn tokenize(text: &str) -> std::result::Result<Vec<(Token, usize, usize)>, ParseError> {
    let mut tokens = Vec::new();
    for (line_index, line) in text.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let column = i + 1;
            let line_no = line_index + 1;
            let take = |start: usize, pred: &dyn Fn(char) -> bool| {
                let mut end = start;
                while end < chars.len() && pred(chars[end]) {
                    end += 1;
                }
                (chars[start..end].iter().collect::<String>(), end)
            };
            if c.is_whitespace() {
                i += 1;
            } else if c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            } else if c == '%' || c == '@' {
                let (name, end) = take(i + 1, &name_char);
                if name.is_empty() {
                    return Err(ParseError {
                        line: line_no,
                        column,
                        message: format!("expected a name after `{c}`"),
                    });
                }
                tokens.push((
                    if c == '%' {
                        Token::Value(name)
                    } else {
                        Token::Const(name)
                    },
                    line_no,
                    column,
                ));
                i = end;
            } else if c.is_ascii_alphabetic() || c == '_' {
                let (name, end) = take(i, &|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
                tokens.push((Token::Ident(name), line_no, column));
                i = end;
            } else if c.is_ascii_digit() || c == '-' {
                let mut end = i + 1;
                while end < chars.len() {
                    let d = chars[end];
                    let exponent_sign = matches!(d, '-' | '+') && matches!(chars[end - 1], 'e' | 'E');
                    if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E') || exponent_sign {
                        end += 1;
                    } else {
                        break;
                    }
                }
                tokens.push((Token::Number(chars[i..end].iter().collect()), line_no, column));
                i = end;
            } else if "(){}[],:=".contains(c) {
                tokens.push((Token::Punct(c), line_no, column));
                i += 1;
            } else {
                return Err(ParseError {
                    line: line_no,
                    column,
                    message: format!("unexpected character `{c}`"),
                });
            }
        }
    }
    let (line, column) = tokens.last().map(|t| (t.1, t.2 + 1)).unwrap_or((1, 1));
    tokens.push((Token::End, line, column));
    Ok(tokens)
}
