//! Parsing memory sizes given on the command line.

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
    }
}
