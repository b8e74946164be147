//! Reading an address book exported as vCard (3.0 and 4.0) or CSV into (name, number) entries, with
//! every number normalised to E.164 (national numbers with a region). Entries that cannot be read are
//! reported with their line and the reason, never silently dropped; duplicates are merged.

use std::collections::BTreeMap;

use natter_proto::PhoneNumber;

/// Entries an address book may hold.
pub const MAX_BOOK_ENTRIES: usize = 200_000;
/// Bytes an address-book file may have.
pub const MAX_BOOK_BYTES: u64 = 64 * 1024 * 1024;

/// One number of the address book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BookEntry {
    /// The name the book gives it (may be empty).
    pub name: String,
    /// The number, normalised.
    pub number: PhoneNumber,
}

/// Something of the address book that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line of the file.
    pub line: usize,
    /// What was there (shortened).
    pub text: String,
    /// Why it was skipped.
    pub reason: String,
}

/// A parsed address book.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedBook {
    /// Distinct numbers, by number.
    pub entries: Vec<BookEntry>,
    /// What was skipped.
    pub rejected: Vec<Rejected>,
}

fn short(s: &str) -> String {
    s.trim().chars().take(64).collect()
}

/// Parses vCard text (if it holds `BEGIN:VCARD`) or CSV text. `region` (ISO 3166, e.g. `US`) places
/// national numbers.
pub fn parse_address_book(text: &str, region: Option<&str>) -> ParsedBook {
    let mut book = Book::default();
    if text
        .lines()
        .take(50)
        .any(|l| l.trim().eq_ignore_ascii_case("BEGIN:VCARD"))
    {
        parse_vcard(text, region, &mut book);
    } else {
        parse_csv(text, region, &mut book);
    }
    book.finish()
}

#[derive(Default)]
struct Book {
    by_number: BTreeMap<PhoneNumber, String>,
    rejected: Vec<Rejected>,
    full: bool,
}

impl Book {
    fn add(&mut self, line: usize, name: &str, raw: &str, region: Option<&str>) {
        match PhoneNumber::parse_in(raw, region) {
            Ok(number) => {
                if self.by_number.len() >= MAX_BOOK_ENTRIES && !self.by_number.contains_key(&number)
                {
                    if !self.full {
                        self.full = true;
                        self.reject(line, raw, &format!("more than {MAX_BOOK_ENTRIES} numbers"));
                    }
                    return;
                }
                let e = self.by_number.entry(number).or_default();
                if e.is_empty() {
                    *e = name.trim().chars().take(128).collect();
                }
            }
            Err(_) => self.reject(
                line,
                raw,
                if region.is_none() && !raw.trim().starts_with('+') {
                    "not an international number (+...), and no region was given"
                } else {
                    "not a valid phone number"
                },
            ),
        }
    }

    fn reject(&mut self, line: usize, text: &str, reason: &str) {
        self.rejected.push(Rejected {
            line,
            text: short(text),
            reason: reason.to_owned(),
        });
    }

    fn finish(self) -> ParsedBook {
        ParsedBook {
            entries: self
                .by_number
                .into_iter()
                .map(|(number, name)| BookEntry { name, number })
                .collect(),
            rejected: self.rejected,
        }
    }
}

/// vCard: unfolds continuation lines, then takes `FN` (or `N`) and every `TEL` of each card.
fn parse_vcard(text: &str, region: Option<&str>, book: &mut Book) {
    // (first line number, unfolded content line)
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if (raw.starts_with(' ') || raw.starts_with('\t')) && !lines.is_empty() {
            if let Some(last) = lines.last_mut() {
                last.1.push_str(&raw[1..]);
            }
        } else {
            lines.push((i + 1, raw.trim_end_matches('\r').to_owned()));
        }
    }
    let mut in_card = false;
    let mut start = 0;
    let mut name = String::new();
    let mut tels: Vec<(usize, String)> = Vec::new();
    for (line, content) in lines {
        let Some((key, value)) = content.split_once(':') else {
            continue;
        };
        let prop = key.split(';').next().unwrap_or("").trim();
        let prop = prop.rsplit('.').next().unwrap_or(prop).to_ascii_uppercase();
        match prop.as_str() {
            "BEGIN" if value.trim().eq_ignore_ascii_case("VCARD") => {
                in_card = true;
                start = line;
                name.clear();
                tels.clear();
            }
            "END" if value.trim().eq_ignore_ascii_case("VCARD") => {
                if in_card {
                    if tels.is_empty() {
                        book.reject(start, &name, "a card without a phone number");
                    }
                    for (l, tel) in tels.drain(..) {
                        book.add(l, &name, &tel, region);
                    }
                }
                in_card = false;
            }
            "FN" if in_card => name = unescape(value),
            "N" if in_card && name.is_empty() => {
                // N:Family;Given;Additional;Prefix;Suffix
                let parts: Vec<&str> = value.split(';').collect();
                let given = parts.get(1).copied().unwrap_or("");
                let family = parts.first().copied().unwrap_or("");
                name = unescape(format!("{given} {family}").trim());
            }
            "TEL" if in_card => {
                let v = value.trim();
                let v = v.strip_prefix("tel:").unwrap_or(v);
                // vCard 4 URIs may carry parameters (";ext=12"): the number is what precedes them.
                let v = v.split(';').next().unwrap_or(v);
                tels.push((line, v.to_owned()));
            }
            _ => {}
        }
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\,", ",")
        .replace("\\;", ";")
        .replace("\\n", " ")
        .trim()
        .to_owned()
}

/// CSV with a header: the columns whose header names a phone (`phone`, `mobile`, `tel`, `number`) hold
/// numbers, the first column whose header says `name` the name. Without such a header every field that
/// reads as a number is taken.
fn parse_csv(text: &str, region: Option<&str>, book: &mut Book) {
    let mut rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((header_line, header)) = rows.next() else {
        return;
    };
    let header = split_csv(header);
    let is_phone = |h: &str| {
        let h = h.to_ascii_lowercase();
        ["phone", "mobile", "tel", "number", "cell"]
            .iter()
            .any(|k| h.contains(k))
    };
    let phone_cols: Vec<usize> = (0..header.len())
        .filter(|&i| is_phone(&header[i]))
        .collect();
    let name_col = header
        .iter()
        .position(|h| h.to_ascii_lowercase().contains("name"));
    let mut handle = |line: usize, fields: Vec<String>| {
        let name = name_col
            .and_then(|i| fields.get(i))
            .cloned()
            .unwrap_or_default();
        if phone_cols.is_empty() {
            let mut any = false;
            for f in &fields {
                if PhoneNumber::parse_in(f, region).is_ok() {
                    book.add(line, "", f, region);
                    any = true;
                }
            }
            if !any {
                book.reject(line, &fields.join(","), "no phone number in this row");
            }
            return;
        }
        let mut any = false;
        for &i in &phone_cols {
            if let Some(f) = fields.get(i).filter(|f| !f.trim().is_empty()) {
                book.add(line, &name, f, region);
                any = true;
            }
        }
        if !any {
            book.reject(line, &fields.join(","), "no phone number in this row");
        }
    };
    if phone_cols.is_empty() {
        // No header naming a phone column: the first row is data too.
        handle(header_line + 1, header.clone());
    }
    for (i, l) in rows {
        handle(i + 1, split_csv(l));
    }
}

/// One CSV row: comma-separated, fields optionally in double quotes (`""` for a quote inside).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) | (';', false) => fields.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    fields.push(cur);
    fields.into_iter().map(|f| f.trim().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(b: &ParsedBook) -> Vec<&str> {
        b.entries.iter().map(|e| e.number.as_str()).collect()
    }

    #[test]
    fn vcard_3_and_4() {
        let text = "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Ann Example\r\nTEL;TYPE=CELL:+1 202-555-0101\r\n\
                    TEL;TYPE=HOME:(202) 555-0102\r\nEND:VCARD\r\n\
                    BEGIN:VCARD\nVERSION:4.0\nN:Bee;Bob;;;\nTEL;VALUE=uri;TYPE=\"voice,cell\":tel:+1-202-555-0103;ext=7\nEND:VCARD\n\
                    BEGIN:VCARD\nVERSION:4.0\nFN:Folded\n Name\nitem1.TEL:+49 30\n 1234567\nEND:VCARD\n\
                    BEGIN:VCARD\nFN:No Number\nEMAIL:x@example.com\nEND:VCARD\n\
                    BEGIN:VCARD\nFN:Bad\nTEL:call me\nEND:VCARD\n";
        let b = parse_address_book(text, Some("US"));
        assert_eq!(
            numbers(&b),
            vec![
                "+12025550101",
                "+12025550102",
                "+12025550103",
                "+49301234567"
            ]
        );
        assert_eq!(b.entries[0].name, "Ann Example");
        assert_eq!(b.entries[2].name, "Bob Bee");
        assert_eq!(b.entries[3].name, "FoldedName");
        assert_eq!(b.rejected.len(), 2, "{:?}", b.rejected);
        assert!(b.rejected[0].reason.contains("without a phone"));
        assert_eq!(b.rejected[1].text, "call me");
        assert_eq!(b.rejected[1].line, 25);
    }

    #[test]
    fn national_numbers_need_a_region() {
        let text = "BEGIN:VCARD\nFN:A\nTEL:(202) 555-0101\nEND:VCARD\n";
        let b = parse_address_book(text, None);
        assert!(b.entries.is_empty());
        assert!(
            b.rejected[0].reason.contains("no region"),
            "{:?}",
            b.rejected
        );
    }

    #[test]
    fn csv_with_and_without_header() {
        let text = "Name,Mobile Phone,Home Phone\n\"Doe, Jane\",+1 202 555 0104,\n\
                    Joe,,202-555-0105\nNobody,,\n\"Quote \"\"Q\"\"\",not a number,\n";
        let b = parse_address_book(text, Some("us"));
        assert_eq!(numbers(&b), vec!["+12025550104", "+12025550105"]);
        assert_eq!(b.entries[0].name, "Doe, Jane");
        assert_eq!(b.rejected.len(), 2, "{:?}", b.rejected);
        assert_eq!(b.rejected[0].line, 4);
        assert_eq!(b.rejected[1].text, "not a number");

        let bare = "+12025550106\n+12025550106\nhello\n";
        let b = parse_address_book(bare, None);
        assert_eq!(numbers(&b), vec!["+12025550106"], "duplicates merged");
        assert_eq!(b.rejected.len(), 1);
    }

    #[test]
    fn garbage_is_reported_not_fatal() {
        for text in [
            "",
            "\n\n",
            "\u{0}\u{1}binary",
            "BEGIN:VCARD\nTEL:",
            "a,b\n\"unterminated",
        ] {
            let b = parse_address_book(text, Some("US"));
            assert!(b.entries.is_empty(), "{text:?}");
        }
    }
}
