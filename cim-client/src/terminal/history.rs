//! Local message history: every message this user sent or received through the terminal
//! client, one JSON object per line (`history.jsonl`), append-only and bounded.
//!
//! Why JSONL: appending one line is one `write` to a file opened with `O_APPEND`, so a crash
//! loses at most the line being written and never corrupts earlier ones; a torn or foreign line
//! is skipped when reading. Why bounded: the file keeps at most `max_lines` entries; past that
//! (plus 10 % slack, so the rewrite happens once per `max_lines / 10` appends and not on every
//! append) it is compacted to the newest `max_lines` through a temporary file and a rename.
//!
//! The file is private to the user (mode 0600, directory 0700): it holds their conversations.

use serde::{Deserialize, Serialize};
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
};

/// Default bound on the number of stored messages.
pub const DEFAULT_MAX_LINES: usize = 10_000;

/// Longest line read back. Longer lines (not written by us: a body is at most one frame, 64 KiB
/// by default) are skipped, so a damaged file cannot make a search allocate without limit.
const MAX_LINE_BYTES: usize = 1 << 20;

/// Sent by this user, or received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// How the message was addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Private,
    Group,
    System,
    /// To the members of a channel; `to` is the channel's name (without `#`).
    Channel,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix milliseconds, as the route stamped it.
    pub ts: i64,
    /// Message id (chosen by the sending client, or by the route when it did not).
    pub id: String,
    pub dir: Direction,
    pub kind: Kind,
    /// Sender name.
    pub from: String,
    /// Receiver name for private messages, the channel's name for channel messages; `None`
    /// for group and system messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub body: String,
}

impl Entry {
    /// Text a search looks at: who, to whom, what (not the time, which is rendered apart).
    pub fn searchable(&self) -> String {
        let to = match (&self.to, self.kind) {
            (Some(channel), Kind::Channel) => format!("#{channel}"),
            (Some(to), _) => to.clone(),
            (None, Kind::Group) => "all".into(),
            (None, _) => "you".into(),
        };
        format!("{} → {}: {}", self.from, to, self.body)
    }
}

/// The history file of one user.
pub struct History {
    path: PathBuf,
    file: File,
    max_lines: usize,
    /// Lines in the file (counted at open, then kept up to date).
    lines: usize,
}

impl History {
    /// Opens (creating it and its directory) the history at `path`.
    pub fn open(path: &Path, max_lines: usize) -> io::Result<Self> {
        let max_lines = max_lines.max(1);
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let lines = match File::open(path) {
            Ok(f) => count_lines(f)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut history = Self {
            path: path.to_path_buf(),
            file: open_append(path)?,
            max_lines,
            lines,
        };
        // A file grown past the bound (by an older version, or a smaller bound now) is cut at once.
        if history.lines > history.max_lines {
            history.compact()?;
        }
        Ok(history)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one message, compacting the file when it grew past the bound plus slack.
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_string(entry).map_err(io::Error::other)?;
        line.push('\n');
        // One write of the whole line: with O_APPEND the line lands in one piece.
        self.file.write_all(line.as_bytes())?;
        self.lines += 1;
        if self.lines > self.max_lines + self.max_lines / 10 {
            self.compact()?;
        }
        Ok(())
    }

    /// Keeps only the newest `max_lines` lines.
    fn compact(&mut self) -> io::Result<()> {
        let mut keep: VecDeque<String> = VecDeque::with_capacity(self.max_lines.min(1 << 16));
        for line in read_lines(&self.path)? {
            if keep.len() == self.max_lines {
                keep.pop_front();
            }
            keep.push_back(line);
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            let mut out = io::BufWriter::new(create_private_file(&tmp)?);
            for line in &keep {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.lines = keep.len();
        Ok(())
    }

    /// The newest `limit` entries whose [`Entry::searchable`] text contains `keyword`
    /// (case-insensitive), oldest first, and how many older matches were left out.
    pub fn search(&self, keyword: &str, limit: usize) -> io::Result<(Vec<Entry>, usize)> {
        let mut found: VecDeque<Entry> = VecDeque::new();
        let mut left_out = 0;
        for line in read_lines(&self.path)? {
            // Lines that do not decode (torn by a crash, edited by hand) are skipped.
            let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
                continue;
            };
            if find_matches(&entry.searchable(), keyword).is_empty() {
                continue;
            }
            if limit == 0 {
                left_out += 1;
                continue;
            }
            if found.len() == limit {
                found.pop_front();
                left_out += 1;
            }
            found.push_back(entry);
        }
        Ok((found.into(), left_out))
    }
}

/// Byte ranges in `text` where `keyword` occurs, compared case-insensitively character by
/// character (so `ß`/`İ`-like case mappings that change length cannot misalign the ranges),
/// left to right, not overlapping. An empty keyword matches nothing.
pub fn find_matches(text: &str, keyword: &str) -> Vec<(usize, usize)> {
    let needle: Vec<char> = keyword.chars().collect();
    let mut out = Vec::new();
    if needle.is_empty() {
        return out;
    }
    let mut start = 0;
    while start < text.len() {
        let mut chars = text[start..].char_indices();
        let mut end = None;
        for (i, want) in needle.iter().enumerate() {
            match chars.next() {
                Some((_, got)) if same_letter(got, *want) => {
                    if i + 1 == needle.len() {
                        end = Some(start + chars.offset());
                    }
                }
                _ => break,
            }
        }
        match end {
            Some(end) => {
                out.push((start, end));
                start = end;
            }
            None => {
                // Next character boundary.
                start += text[start..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    out
}

fn same_letter(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase())
}

fn count_lines(f: File) -> io::Result<usize> {
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(n);
        }
        n += 1;
    }
}

/// The file's lines (without newline), skipping over-long and non-UTF-8 ones. A read error
/// ends the iteration: a search then shows what it found so far.
fn read_lines(path: &Path) -> io::Result<impl Iterator<Item = String>> {
    let file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut reader = file.map(BufReader::new);
    Ok(std::iter::from_fn(move || {
        let reader = reader.as_mut()?;
        loop {
            let mut buf = Vec::new();
            // `take` bounds one line; a longer one is consumed to its end and skipped.
            let n = reader
                .by_ref()
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .ok()?;
            if n == 0 {
                return None;
            }
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            } else if buf.len() > MAX_LINE_BYTES {
                skip_line(reader).ok()?;
                continue;
            }
            if let Ok(line) = String::from_utf8(buf) {
                return Some(line);
            }
        }
    }))
}

/// Consumes the rest of the current line.
fn skip_line(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(());
        }
        if let Some(i) = available.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(());
        }
        let len = available.len();
        reader.consume(len);
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    private_mode(&mut options);
    options.open(path)
}

fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).write(true).truncate(true);
    private_mode(&mut options);
    options.open(path)
}

#[cfg(unix)]
fn private_mode(options: &mut OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    options.mode(0o600);
}

#[cfg(not(unix))]
fn private_mode(_: &mut OpenOptions) {}

/// Creates `dir` and its parents; the directories created are readable by the user only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize, body: &str) -> Entry {
        // Alternate directions and senders, and make every third message a group message.
        let mine = i.is_multiple_of(2);
        let group = i.is_multiple_of(3);
        Entry {
            ts: 1_700_000_000_000 + i as i64,
            id: format!("id{i}"),
            dir: if mine { Direction::Out } else { Direction::In },
            kind: if group { Kind::Group } else { Kind::Private },
            from: if mine { "alice" } else { "bob" }.into(),
            to: (!group).then(|| if mine { "bob" } else { "alice" }.into()),
            body: body.into(),
        }
    }

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/history.jsonl");
        (dir, path)
    }

    #[test]
    fn matches_are_case_insensitive_and_not_overlapping() {
        assert_eq!(find_matches("Hi hi HI", "hi"), vec![(0, 2), (3, 5), (6, 8)]);
        assert_eq!(find_matches("aaaa", "aa"), vec![(0, 2), (2, 4)]);
        assert_eq!(find_matches("hello", "xyz"), vec![]);
        assert_eq!(find_matches("hello", ""), vec![]);
        assert_eq!(find_matches("", "a"), vec![]);
        assert_eq!(find_matches("ab", "abc"), vec![]);
    }

    #[test]
    fn matches_respect_multibyte_characters() {
        let text = "说你好, ÄRGER und ärger";
        let m = find_matches(text, "你好");
        assert_eq!(m.len(), 1);
        assert_eq!(&text[m[0].0..m[0].1], "你好");
        let m = find_matches(text, "ärger");
        assert_eq!(
            m.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>(),
            vec!["ÄRGER", "ärger"]
        );
    }

    #[test]
    fn append_then_search_finds_newest_matches_oldest_first() {
        let (_dir, path) = temp();
        let mut h = History::open(&path, 100).unwrap();
        for (i, body) in ["hi bob", "nope", "Hi again", "hello", "HI three"]
            .iter()
            .enumerate()
        {
            h.append(&entry(i, body)).unwrap();
        }
        let (found, left_out) = h.search("hi", 10).unwrap();
        let bodies: Vec<_> = found.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, vec!["hi bob", "Hi again", "HI three"]);
        assert_eq!(left_out, 0);

        let (found, left_out) = h.search("hi", 2).unwrap();
        let bodies: Vec<_> = found.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, vec!["Hi again", "HI three"]);
        assert_eq!(left_out, 1);

        // Names are searchable too.
        let (found, _) = h.search("BOB →", 10).unwrap();
        assert!(found.iter().all(|e| e.from == "bob"), "{found:?}");
        assert!(!found.is_empty());
    }

    #[test]
    fn history_survives_reopen_and_skips_bad_lines() {
        let (_dir, path) = temp();
        {
            let mut h = History::open(&path, 100).unwrap();
            h.append(&entry(0, "first")).unwrap();
        }
        // A torn line (crash mid-write) and a foreign one.
        {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(b"{\"ts\":1,\"id\":\ngarbage\n").unwrap();
        }
        let mut h = History::open(&path, 100).unwrap();
        h.append(&entry(1, "second")).unwrap();
        let (found, _) = h.search("s", 10).unwrap();
        let bodies: Vec<_> = found.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, vec!["first", "second"]);
    }

    #[test]
    fn history_is_bounded_to_the_newest_lines() {
        let (_dir, path) = temp();
        let mut h = History::open(&path, 10).unwrap();
        for i in 0..100 {
            h.append(&entry(i, &format!("msg {i}"))).unwrap();
            let lines = fs::read_to_string(&path).unwrap().lines().count();
            assert!(lines <= 11, "{lines} lines after {i} appends");
        }
        let (found, _) = h.search("msg", 100).unwrap();
        assert!(found.len() >= 10 && found.len() <= 11, "{}", found.len());
        assert_eq!(found.last().unwrap().body, "msg 99");
        // Reopening with a smaller bound cuts the file at once.
        drop(h);
        let h = History::open(&path, 3).unwrap();
        let (found, _) = h.search("msg", 100).unwrap();
        let bodies: Vec<_> = found.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(bodies, vec!["msg 97", "msg 98", "msg 99"]);
        assert!(!path.with_extension("jsonl.tmp").exists());
    }

    #[cfg(unix)]
    #[test]
    fn history_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path) = temp();
        let mut h = History::open(&path, 10).unwrap();
        h.append(&entry(0, "secret")).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        let mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "dir mode {mode:o}");
    }

    #[test]
    fn over_long_lines_are_skipped() {
        let (_dir, path) = temp();
        create_private_dir(path.parent().unwrap()).unwrap();
        let long = format!("{{\"x\":\"{}\"}}\n", "a".repeat(MAX_LINE_BYTES + 10));
        let good = serde_json::to_string(&entry(1, "after")).unwrap();
        fs::write(&path, format!("{long}{good}\n")).unwrap();
        let h = History::open(&path, 100).unwrap();
        let (found, _) = h.search("after", 10).unwrap();
        assert_eq!(found.len(), 1);
        let (found, _) = h.search("aaa", 10).unwrap();
        assert!(found.is_empty());
    }

    #[test]
    fn entries_round_trip_as_one_json_line() {
        let e = entry(1, "multi\nline \"quoted\"");
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Entry>(&line).unwrap(), e);
        assert!(line.contains("\"dir\":\"in\""), "{line}");
    }

    #[test]
    fn searchable_text_names_both_ends() {
        let mut e = entry(0, "x");
        e.kind = Kind::Group;
        e.to = None;
        assert_eq!(e.searchable(), "alice → all: x");
        e.kind = Kind::Private;
        e.to = Some("bob".into());
        assert_eq!(e.searchable(), "alice → bob: x");
        e.kind = Kind::Channel;
        e.to = Some("room1".into());
        assert_eq!(e.searchable(), "alice → #room1: x");
        let line = serde_json::to_string(&e).unwrap();
        assert!(
            line.contains(r#""kind":"channel","from":"alice","to":"room1""#),
            "{line}"
        );
    }
}
