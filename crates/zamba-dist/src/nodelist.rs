//! SLURM's compressed host lists: `node[01-04,07],gpu-a[1-2]` → node01 … node04, node07,
//! gpu-a1, gpu-a2. Zero padding is kept (`[08-10]` → 08, 09, 10); a host may have several
//! bracket groups (`r[1-2]n[1-2]` → r1n1, r1n2, r2n1, r2n2).

use crate::DistError;

/// Refuses lists that expand past this many hosts (a typo like `[1-99999999]`).
const MAX_HOSTS: usize = 1 << 20;

/// Expands a SLURM host list into host names, in order.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, DistError> {
    let err = |why: &str| DistError::Invalid(format!("SLURM node list `{list}`: {why}"));
    if list.trim().is_empty() {
        return Err(err("it is empty"));
    }
    let mut hosts = Vec::new();
    for pattern in split_top_level(list).map_err(|why| err(&why))? {
        if pattern.is_empty() {
            return Err(err("it has an empty host name (two commas in a row?)"));
        }
        let expanded = expand_host(pattern).map_err(|why| err(&why))?;
        hosts.extend(expanded);
        if hosts.len() > MAX_HOSTS {
            return Err(err(&format!("it expands to more than {MAX_HOSTS} hosts")));
        }
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err("nested `[`".into()),
            '[' => depth = 1,
            ']' if depth == 0 => return Err("`]` without `[`".into()),
            ']' => depth = 0,
            ',' if depth == 0 => {
                parts.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("`[` without `]`".into());
    }
    parts.push(list[start..].trim());
    Ok(parts)
}

/// One host pattern, e.g. `rack[1-2]-node[01,03]`: the product of its bracket groups.
fn expand_host(pattern: &str) -> Result<Vec<String>, String> {
    let mut hosts = vec![String::new()];
    let mut rest = pattern;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').ok_or("`[` without `]`")?;
        let prefix = &rest[..open];
        let values = expand_ranges(&rest[open + 1..close])?;
        if hosts.len().saturating_mul(values.len()) > MAX_HOSTS {
            return Err(format!("it expands to more than {MAX_HOSTS} hosts"));
        }
        hosts = hosts
            .iter()
            .flat_map(|h| values.iter().map(move |v| format!("{h}{prefix}{v}")))
            .collect();
        rest = &rest[close + 1..];
    }
    for h in hosts.iter_mut() {
        h.push_str(rest);
    }
    Ok(hosts)
}

/// `01-04,07` → 01 02 03 04 07, keeping the width of the lower bound.
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    let mut values = Vec::new();
    for range in ranges.split(',') {
        let range = range.trim();
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let number = |s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "`{range}` in brackets is not a number or a range a-b"
                ));
            }
            s.parse().map_err(|_| format!("`{s}` is too large"))
        };
        let (start, end) = (number(lo)?, number(hi)?);
        if end < start {
            return Err(format!("the range `{range}` runs backwards"));
        }
        if end - start >= MAX_HOSTS as u64 {
            return Err(format!(
                "the range `{range}` has more than {MAX_HOSTS} hosts"
            ));
        }
        let width = lo.len();
        values.extend((start..=end).map(|n| format!("{n:0width$}")));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(list: &str) -> Vec<String> {
        expand_nodelist(list).unwrap()
    }

    #[test]
    fn expands_ranges_lists_and_padding() {
        assert_eq!(
            ok("node[01-04,07],gpu-a[1-2]"),
            [
                "node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"
            ]
        );
        assert_eq!(ok("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(ok("n[08-10]"), ["n08", "n09", "n10"]);
        assert_eq!(ok("login1"), ["login1"]);
        assert_eq!(ok("a,b[3],c"), ["a", "b3", "c"]);
        assert_eq!(
            ok("r[1-2]n[1-2]-ib"),
            ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]
        );
        assert_eq!(ok("x[007]"), ["x007"]);
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in [
            "",
            "n[1-",
            "n1]",
            "n[[1]]",
            "n[a-b]",
            "n[5-3]",
            "n[1-2],,m",
            "n[]",
            "n[1-]",
            "n[0-99999999]",
        ] {
            let e = expand_nodelist(bad).unwrap_err().to_string();
            assert!(e.contains("SLURM node list"), "{bad}: {e}");
        }
    }
}
