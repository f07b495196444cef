//! Parsing sizes given on a command line (`ftvm run --mem 1G`, `--max-size 100M`, the
//! benchmarks' `--mem`): one parser for the CLI and the tools that drive it. The other way,
//! bytes for people, is [`crate::format_bytes`].

/// Parses `256`, `256M`, `256MiB`, `1G`, `512K` into bytes. A bare number is MiB.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("{s:?} is not a size; use e.g. 256M, 1G or 512 (MiB)"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use K, M or G")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err("memory size must not be zero".into());
    }
    Ok(bytes)
}

/// Parses a byte size: `4096`, `512K`, `100M`, `2G`. A bare number is bytes.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return t.parse().map_err(|_| format!("{s:?} is too large"));
    }
    parse_mem_size(s)
}

/// Parses a memory size as [`parse_mem_size`] does, into whole MiB: `256`, `256M`, `1G` -> 256,
/// 256, 1024 (the unit `ftvm run --mem` sizes in; `1536K` is refused).
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let bytes = parse_mem_size(s)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_mem_size("256"), Ok(256 << 20));
        assert_eq!(parse_mem_size("256M"), Ok(256 << 20));
        assert_eq!(parse_mem_size("1G"), Ok(1 << 30));
        assert_eq!(parse_mem_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_mem_size("512k"), Ok(512 << 10));
        assert!(parse_mem_size("").is_err());
        assert!(parse_mem_size("0").is_err());
        assert!(parse_mem_size("12X").is_err());
        assert!(parse_mem_size("M").is_err());
        assert!(parse_mem_size("99999999999999999999G").is_err());
        assert!(parse_mem_size("18014398509481984G").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size("0"), Ok(0));
        assert_eq!(parse_byte_size("512K"), Ok(512 << 10));
        assert_eq!(parse_byte_size(" 100M "), Ok(100 << 20));
        assert_eq!(parse_byte_size("2G"), Ok(2 << 30));
        assert!(parse_byte_size("").is_err());
        assert!(parse_byte_size("1T").is_err());
    }

    #[test]
    fn mib_sizes() {
        assert_eq!(parse_mem_mib("256"), Ok(256));
        assert_eq!(parse_mem_mib("256M"), Ok(256));
        assert_eq!(parse_mem_mib("1G"), Ok(1024));
        assert_eq!(parse_mem_mib("1g"), Ok(1024));
        assert_eq!(parse_mem_mib("2048K"), Ok(2));
        assert!(parse_mem_mib("1536K").is_err());
        assert!(parse_mem_mib("0").is_err());
        assert!(parse_mem_mib("lots").is_err());
    }
}
