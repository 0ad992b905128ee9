//! Slurm's host list syntax (`SLURM_JOB_NODELIST`, `scontrol show hostnames`):
//! hosts separated by commas (or white space), each host a pattern of text and
//! bracket groups of numbers and ranges.
//!
//! | list | hosts |
//! |---|---|
//! | `node[01-03,07],gpu5` | node01 node02 node03 node07 gpu5 |
//! | `a-[1-2]-b` | a-1-b a-2-b |
//! | `n[1-2]r[3-4]` | n1r3 n1r4 n2r3 n2r4 (the first group varies slowest) |
//! | `x[8-10]`, `x[008-10]` | x8 x9 x10; x008 x009 x010 (the low end's digits set the width) |
//!
//! As in Slurm's `hostlist.c`, a range holds at most 65536 hosts; unlike it, text
//! after a bracket group (`a-[1-2]-b`) is accepted, as newer Slurm does, and white
//! space inside a bracket group is refused.
use std::fmt::Write;

/// Hosts of one range, at most (Slurm's `MAX_RANGE`).
const MAX_RANGE: u64 = 1 << 16;

/// A parsed host list; [`HostList::first`] without expanding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostList {
    patterns: Vec<Vec<Part>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Group(Vec<Range>),
}

/// `lo..=hi`, printed with at least `width` digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Range {
    fn len(&self) -> u64 {
        self.hi - self.lo + 1
    }
}

impl HostList {
    /// Parses `list`; the error says what is wrong and where (a byte offset).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        let mut start = 0;
        let mut depth_open: Option<usize> = None;
        for (i, c) in list.char_indices() {
            match c {
                '[' if depth_open.is_some() => return Err(format!("'[' at byte {i} inside a bracket group")),
                '[' => depth_open = Some(i),
                ']' if depth_open.is_none() => return Err(format!("']' at byte {i} without its '['")),
                ']' => depth_open = None,
                c if depth_open.is_none() && (c == ',' || c.is_whitespace()) => {
                    if start < i {
                        patterns.push(parse_pattern(&list[start..i], start)?);
                    }
                    start = i + c.len_utf8();
                }
                _ => {}
            }
        }
        if let Some(i) = depth_open {
            return Err(format!("'[' at byte {i} is not closed"));
        }
        if start < list.len() {
            patterns.push(parse_pattern(&list[start..], start)?);
        }
        if patterns.is_empty() {
            return Err("no host in it".into());
        }
        Ok(Self { patterns })
    }

    /// The first host (rank 0's node under `srun`'s default distribution).
    pub fn first(&self) -> String {
        let mut host = String::new();
        for part in &self.patterns[0] {
            match part {
                Part::Text(t) => host.push_str(t),
                Part::Group(ranges) => push_number(&mut host, ranges[0].lo, ranges[0].width),
            }
        }
        host
    }

    /// How many hosts the list names, at least one (duplicates counted, like Slurm).
    pub fn count(&self) -> u128 {
        self.patterns.iter().map(|p| pattern_len(p)).sum()
    }

    /// Every host in Slurm's order, generated one by one.
    pub fn hosts(&self) -> impl Iterator<Item = String> + '_ {
        self.patterns.iter().flat_map(|p| PatternHosts::new(p))
    }
}

fn pattern_len(parts: &[Part]) -> u128 {
    parts
        .iter()
        .map(|p| match p {
            Part::Text(_) => 1,
            Part::Group(ranges) => ranges.iter().map(|r| r.len() as u128).sum(),
        })
        .product()
}

fn push_number(out: &mut String, n: u64, width: usize) {
    write!(out, "{n:0width$}").expect("writing to a String");
}

/// One host pattern such as `n[1-2]r[3-4]`; `at` is its byte offset in the list.
fn parse_pattern(text: &str, at: usize) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    let mut offset = at;
    while !rest.is_empty() {
        match rest.find('[') {
            Some(0) => {
                let close = rest.find(']').expect("brackets are balanced by HostList::parse");
                parts.push(Part::Group(parse_group(&rest[1..close], offset + 1)?));
                rest = &rest[close + 1..];
                offset += close + 1;
            }
            Some(open) => {
                parts.push(Part::Text(rest[..open].to_string()));
                rest = &rest[open..];
                offset += open;
            }
            None => {
                parts.push(Part::Text(rest.to_string()));
                rest = "";
            }
        }
    }
    Ok(parts)
}

/// The inside of a bracket group: `01-03,07`.
fn parse_group(text: &str, at: usize) -> Result<Vec<Range>, String> {
    if text.is_empty() {
        return Err(format!("empty bracket group at byte {}", at - 1));
    }
    let mut ranges = Vec::new();
    let mut offset = at;
    for item in text.split(',') {
        ranges.push(parse_range(item, offset)?);
        offset += item.len() + 1;
    }
    Ok(ranges)
}

/// `7` or `01-03`: the low end's digits give the width.
fn parse_range(item: &str, at: usize) -> Result<Range, String> {
    let number = |s: &str| -> Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{item:?} at byte {at} is not a number or a range like 1-4"));
        }
        s.parse::<u64>().map_err(|_| format!("{s:?} at byte {at} is too large"))
    };
    let (lo_text, hi_text) = item.split_once('-').unwrap_or((item, item));
    let (lo, hi) = (number(lo_text)?, number(hi_text)?);
    if lo > hi {
        return Err(format!("the range {item:?} at byte {at} runs backwards"));
    }
    if hi - lo >= MAX_RANGE {
        return Err(format!("the range {item:?} at byte {at} has more than {MAX_RANGE} hosts"));
    }
    Ok(Range { lo, hi, width: lo_text.len() })
}

/// The hosts of one pattern: an odometer over its bracket groups, the last
/// group turning fastest.
struct PatternHosts<'a> {
    parts: &'a [Part],
    /// Per part: the position inside its group (0 for text).
    pos: Vec<u64>,
    done: bool,
}

impl<'a> PatternHosts<'a> {
    fn new(parts: &'a [Part]) -> Self {
        Self { parts, pos: vec![0; parts.len()], done: false }
    }
}

impl Iterator for PatternHosts<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        let mut host = String::new();
        for (part, &pos) in self.parts.iter().zip(&self.pos) {
            match part {
                Part::Text(t) => host.push_str(t),
                Part::Group(ranges) => {
                    let mut k = pos;
                    for r in ranges {
                        if k < r.len() {
                            push_number(&mut host, r.lo + k, r.width);
                            break;
                        }
                        k -= r.len();
                    }
                }
            }
        }
        // Advance: the last group turns fastest.
        self.done = true;
        for (part, pos) in self.parts.iter().zip(self.pos.iter_mut()).rev() {
            if let Part::Group(ranges) = part {
                *pos += 1;
                if *pos < ranges.iter().map(Range::len).sum::<u64>() {
                    self.done = false;
                    break;
                }
                *pos = 0;
            }
        }
        Some(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        HostList::parse(list).unwrap_or_else(|e| panic!("{list:?}: {e}")).hosts().collect()
    }

    #[test]
    fn expands_ranges_padding_and_several_groups() {
        assert_eq!(hosts("node[01-03,07],gpu5"), ["node01", "node02", "node03", "node07", "gpu5"]);
        assert_eq!(hosts("a-[1-2]-b"), ["a-1-b", "a-2-b"]);
        assert_eq!(hosts("n[1-2]r[3-4]"), ["n1r3", "n1r4", "n2r3", "n2r4"]);
        assert_eq!(hosts("n[1-2][3-4]"), ["n13", "n14", "n23", "n24"]);
        assert_eq!(hosts("x[8-10]"), ["x8", "x9", "x10"]);
        assert_eq!(hosts("x[008-10]"), ["x008", "x009", "x010"]);
        assert_eq!(hosts("x[09-11]"), ["x09", "x10", "x11"]);
        assert_eq!(hosts("x[1-010]").len(), 10);
        assert_eq!(hosts("[1-2]"), ["1", "2"]);
        assert_eq!(hosts("vm"), ["vm"]);
        assert_eq!(hosts(" a , b\tc,,"), ["a", "b", "c"]);
        assert_eq!(hosts("n[1,1]"), ["n1", "n1"]);
        assert_eq!(hosts("gpu-a100-[0-1]"), ["gpu-a100-0", "gpu-a100-1"]);
    }

    #[test]
    fn first_host_needs_no_expansion() {
        let cases = [
            ("node[01-03,07],gpu5", "node01"),
            ("n[1-2]r[3-4]", "n1r3"),
            ("a-[1-2]-b", "a-1-b"),
            ("gpu5,node[01-03]", "gpu5"),
            ("n[000-65535]", "n000"),
            ("n[7,1-3]", "n7"),
        ];
        for (list, first) in cases {
            let l = HostList::parse(list).unwrap();
            assert_eq!(l.first(), first, "{list}");
            assert_eq!(l.hosts().next().unwrap(), first, "{list}");
            assert_eq!(l.hosts().count() as u128, l.count(), "{list}");
        }
        let big = HostList::parse("r[0-65535]n[0-65535]").unwrap();
        assert_eq!((big.first(), big.count()), ("r0n0".to_string(), 1 << 32));
    }

    #[test]
    fn refuses_what_is_not_a_host_list() {
        let cases = [
            ("n[1-", "not closed"),
            ("n[1-2", "not closed"),
            ("n1-2]", "without its '['"),
            ("n[[1]]", "inside a bracket group"),
            ("n[]", "empty bracket group"),
            ("n[3-1]", "runs backwards"),
            ("n[a-b]", "not a number"),
            ("n[-1]", "not a number"),
            ("n[1--2]", "not a number"),
            ("n[1,]", "not a number"),
            ("n[1, 2]", "not a number"),
            ("n[1-70000]", "more than 65536 hosts"),
            ("n[99999999999999999999]", "too large"),
            ("", "no host"),
            (" , ", "no host"),
        ];
        for (list, why) in cases {
            let e = HostList::parse(list).expect_err(list);
            assert!(e.contains(why), "{list:?}: {e}");
        }
    }
}
