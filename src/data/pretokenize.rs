//! Exact re-implementations, for ASCII text, of the normalizers and
//! pre-tokenizers of SentencePiece-style (`Metaspace`, DeBERTa-v3) and
//! byte-level BPE (`ByteLevel`, RoBERTa, GPT-2) `tokenizer.json` files.
//!
//! `tokenizers` normalizes and pre-tokenizes through `NormalizedString`, which
//! keeps an alignment per byte and rebuilds it at every step; on ASCII text the
//! same words come out of a few string operations. [`AsciiWords`] writes the
//! words the model would be given, one after another, into a buffer: for a
//! text it does not handle (non-ASCII, or a control character whose class it
//! does not know) it says so, and [`subword`](super::subword) asks `tokenizers`.
use std::ops::Range;

use serde_json::Value;

/// A normalizer step, as it acts on ASCII text whose replacements stay ASCII.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// `Strip`: whitespace (`char::is_whitespace`) off the ends.
    Strip { left: bool, right: bool },
    /// `Lowercase`.
    Lowercase,
    /// `NFC`, `NFD`, `NFKC`, `NFKD`: nothing on ASCII.
    Unicode,
    /// `Replace` of a literal string (leftmost, non-overlapping matches).
    Replace { pattern: String, content: String },
    /// `Replace` of the regex ` {2,}`: each run of two or more spaces.
    SpaceRuns { content: String },
}

/// The words the model sees, for ASCII text, of one supported configuration.
#[derive(Clone, Debug)]
pub enum AsciiWords {
    /// Normalizer steps, then `Metaspace` with `split`: spaces become
    /// `replacement`, which is prepended when `prepend` (`prepend_scheme`
    /// `"always"`) and the text does not start with it; a word starts at each
    /// `replacement`.
    Metaspace { steps: Vec<Step>, replacement: char, prepend: bool },
    /// No normalizer, `ByteLevel` with its regex: GPT-2's pre-tokenizer
    /// regex, then each byte mapped to its character (`Ġ` for a space).
    ByteLevel { add_prefix_space: bool, chars: Box<[char; 256]> },
}

impl AsciiWords {
    /// The ASCII path of a `tokenizer.json` (parsed), or why there is none.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let pre = match &v["pre_tokenizer"] {
            p if p["type"] == "Sequence" => match p["pretokenizers"].as_array().map(Vec::as_slice) {
                Some([one]) => one,
                _ => return Err("a Sequence pre_tokenizer of more than one step".into()),
            },
            p => p,
        };
        match pre["type"].as_str() {
            Some("Metaspace") => {
                let mut replacement = pre["replacement"].as_str().unwrap_or_default().chars();
                let (Some(replacement), None) = (replacement.next(), replacement.next()) else {
                    return Err("Metaspace.replacement is not one character".into());
                };
                let prepend = match pre["prepend_scheme"].as_str() {
                    Some("always") => true,
                    Some("never") => false,
                    other => return Err(format!("Metaspace.prepend_scheme {other:?} is not \"always\" or \"never\"")),
                };
                if pre["split"] != true {
                    return Err("Metaspace.split is not true".into());
                }
                Ok(Self::Metaspace { steps: steps(&v["normalizer"])?, replacement, prepend })
            }
            Some("ByteLevel") => {
                if !v["normalizer"].is_null() {
                    return Err("a ByteLevel tokenizer with a normalizer".into());
                }
                if pre["use_regex"] == false {
                    return Err("ByteLevel.use_regex is false".into());
                }
                let add_prefix_space = pre["add_prefix_space"].as_bool().ok_or("ByteLevel.add_prefix_space")?;
                Ok(Self::ByteLevel { add_prefix_space, chars: Box::new(bytes_char()) })
            }
            _ => Err(format!("pre_tokenizer {} is not Metaspace or ByteLevel", pre["type"])),
        }
    }

    /// Writes the model's words of `text` into `buf` (cleared first), their
    /// ranges into `words`; `false` (and nothing usable) when `text` is one this
    /// path does not handle.
    pub fn words(&self, text: &str, norm: &mut String, buf: &mut String, words: &mut Vec<Range<usize>>) -> bool {
        buf.clear();
        words.clear();
        match self {
            Self::Metaspace { steps, replacement, prepend } => {
                if !text.is_ascii() {
                    return false;
                }
                normalize(steps, text, norm);
                if *prepend && !norm.is_empty() && !norm.starts_with(*replacement) && !norm.starts_with(' ') {
                    buf.push(*replacement);
                }
                for c in norm.chars() {
                    buf.push(if c == ' ' { *replacement } else { c });
                }
                // `split` with `MergedWithNext`: a word starts at each replacement.
                let mut start = 0;
                for (at, _) in buf.match_indices(*replacement) {
                    if at > start {
                        words.push(start..at);
                    }
                    start = at;
                }
                if buf.len() > start {
                    words.push(start..buf.len());
                }
                true
            }
            Self::ByteLevel { add_prefix_space, chars } => {
                let bytes = text.as_bytes();
                if !bytes.iter().all(|&b| matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7E)) {
                    return false;
                }
                let prefix = *add_prefix_space && !bytes.is_empty() && bytes[0] != b' ';
                norm.clear();
                if prefix {
                    norm.push(' ');
                }
                norm.push_str(text);
                for r in gpt2_split(norm.as_bytes()) {
                    let start = buf.len();
                    buf.extend(norm.as_bytes()[r].iter().map(|&b| chars[b as usize]));
                    words.push(start..buf.len());
                }
                true
            }
        }
    }
}

/// The normalizer's steps, when each is one [`Step`] knows.
fn steps(n: &Value) -> Result<Vec<Step>, String> {
    let list = match n["type"].as_str() {
        None if n.is_null() => return Ok(Vec::new()),
        Some("Sequence") => n["normalizers"].as_array().cloned().ok_or("a Sequence normalizer without normalizers")?,
        _ => vec![n.clone()],
    };
    let mut out = Vec::new();
    for s in &list {
        out.push(match s["type"].as_str() {
            Some("Strip") => Step::Strip {
                left: s["strip_left"].as_bool().ok_or("Strip.strip_left")?,
                right: s["strip_right"].as_bool().ok_or("Strip.strip_right")?,
            },
            Some("Lowercase") => Step::Lowercase,
            Some("NFC" | "NFD" | "NFKC" | "NFKD") => Step::Unicode,
            Some("Replace") => {
                let content = s["content"].as_str().ok_or("Replace.content")?.to_string();
                if !content.is_ascii() {
                    return Err(format!("Replace.content {content:?} is not ASCII"));
                }
                match (s["pattern"]["String"].as_str(), s["pattern"]["Regex"].as_str()) {
                    (Some(p), _) if !p.is_empty() => Step::Replace { pattern: p.to_string(), content },
                    (_, Some(" {2,}")) => Step::SpaceRuns { content },
                    _ => return Err(format!("Replace pattern {} is not a literal or \" {{2,}}\"", s["pattern"])),
                }
            }
            _ => return Err(format!("normalizer step {} has no ASCII path", s["type"])),
        });
    }
    Ok(out)
}

/// `text` (ASCII) normalized by `steps` into `out`.
fn normalize(steps: &[Step], text: &str, out: &mut String) {
    out.clear();
    out.push_str(text);
    // `char::is_whitespace` on ASCII.
    let ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r');
    for step in steps {
        match step {
            Step::Strip { left, right } => {
                let end = if *right { out.trim_end_matches(ws).len() } else { out.len() };
                out.truncate(end);
                if *left {
                    let skip = out.len() - out.trim_start_matches(ws).len();
                    out.drain(..skip);
                }
            }
            Step::Lowercase => out.make_ascii_lowercase(),
            Step::Unicode => {}
            Step::Replace { pattern, content } => {
                if out.contains(pattern.as_str()) {
                    *out = out.replace(pattern.as_str(), content);
                }
            }
            Step::SpaceRuns { content } => {
                if out.contains("  ") {
                    let mut s = String::with_capacity(out.len());
                    let mut rest = out.as_str();
                    while let Some(at) = rest.find("  ") {
                        s.push_str(&rest[..at]);
                        s.push_str(content);
                        rest = rest[at..].trim_start_matches(' ');
                    }
                    s.push_str(rest);
                    *out = s;
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Digit,
        b' ' | b'\t' | b'\n' | b'\r' => Class::Space,
        _ => Class::Other,
    }
}

/// The matches, in order, of GPT-2's pre-tokenizer regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// on printable ASCII with tab, LF and CR (where `\p{L}` is a letter, `\p{N}`
/// a digit and `\s` those three and space). The matches cover the text.
fn gpt2_split(s: &[u8]) -> Vec<Range<usize>> {
    let run_end = |from: usize| {
        let c = class(s[from]);
        from + s[from..].iter().take_while(|&&b| class(b) == c).count()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\'' {
            let rest = &s[i + 1..];
            const CONTRACTIONS: [&[u8]; 7] = [b"s", b"t", b"re", b"ve", b"m", b"ll", b"d"];
            if let Some(k) = CONTRACTIONS.iter().find(|c| rest.starts_with(c)).map(|c| c.len()) {
                out.push(i..i + 1 + k);
                i += 1 + k;
                continue;
            }
        }
        if class(s[i]) != Class::Space {
            let end = run_end(i);
            out.push(i..end);
            i = end;
            continue;
        }
        let j = run_end(i);
        if j == s.len() {
            out.push(i..j);
            break;
        }
        // Whitespace before a non-space: `\s+(?!\S)` leaves the last one, which
        // starts the next word when it is a space (` ?\p{L}+`, ...), else is
        // a match of its own (`\s+`).
        if j - i >= 2 {
            out.push(i..j - 1);
        }
        if s[j - 1] == b' ' {
            let end = run_end(j);
            out.push(j - 1..end);
            i = end;
        } else {
            out.push(j - 1..j);
            i = j;
        }
    }
    out
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes map
/// to themselves, the others to U+0100 and up, in byte order.
pub(super) fn bytes_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut n = 0;
    std::array::from_fn(|b| {
        let b = b as u8;
        if printable(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100..U+0143")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        gpt2_split(s.as_bytes()).into_iter().map(|r| &s[r]).collect()
    }

    #[test]
    fn gpt2_regex_cases() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("I'm here's 'sam"), ["I", "'m", " here", "'s", " '", "sam"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("a \n\nb"), ["a", " \n", "\n", "b"]);
        assert_eq!(split("x=1.5;  "), ["x", "=", "1", ".", "5", ";", "  "]);
        assert_eq!(split("\t\tfoo"), ["\t", "\t", "foo"]);
        assert_eq!(split(".'s ''"), [".'", "s", " ''"]);
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_char();
        assert_eq!((t[b' ' as usize], t[b'\n' as usize], t[b'\t' as usize], t[b'a' as usize]), ('Ġ', 'Ċ', 'ĉ', 'a'));
        assert_eq!((t[0], t[0xAD], t[0xFF]), ('Ā', 'Ń', 'ÿ'));
    }

    #[test]
    fn normalizer_steps_on_ascii() {
        let steps = vec![
            Step::Strip { left: true, right: true },
            Step::Replace { pattern: "``".into(), content: "\"".into() },
            Step::Unicode,
            Step::SpaceRuns { content: " ".into() },
        ];
        let mut out = String::new();
        normalize(&steps, " \t``a``   b  c\x0C ", &mut out);
        assert_eq!(out, "\"a\" b c");
    }
}
