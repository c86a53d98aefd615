//! Sizes: `max_body_bytes`, `max_rendered_bytes`, `forward_record_max_bytes`
//! and `log_buffer_bytes` — each bounded, so no client and no acquirer can
//! make the process hold more than the operator chose.

use super::raw::RawConfig;
use super::ConfigError;

/// The size keys, validated (fields as in [`super::Config`]).
pub(super) struct Limits {
    pub(super) max_body_bytes: usize,
    pub(super) max_rendered_bytes: usize,
    pub(super) forward_record_max_bytes: usize,
    pub(super) log_buffer_bytes: usize,
}

pub(super) fn validate(raw: &RawConfig) -> Result<Limits, ConfigError> {
    let max_body_bytes = raw.max_body_bytes.unwrap_or(1 << 20);
    if max_body_bytes == 0 || max_body_bytes > (64 << 20) {
        return Err(ConfigError::new(
            "max_body_bytes",
            "must be between 1 and 67108864",
        ));
    }
    let forward_record_max_bytes = raw.forward_record_max_bytes.unwrap_or(64 << 10);
    if forward_record_max_bytes == 0 || forward_record_max_bytes > (16 << 20) {
        return Err(ConfigError::new(
            "forward_record_max_bytes",
            "must be between 1 and 16777216",
        ));
    }
    let log_buffer_bytes = raw
        .log_buffer_bytes
        .unwrap_or(crate::telemetry::DEFAULT_LOG_BUFFER_BYTES as u64);
    if !(64 << 10..=256 << 20).contains(&log_buffer_bytes) {
        return Err(ConfigError::new(
            "log_buffer_bytes",
            "must be between 65536 and 268435456",
        ));
    }
    let max_rendered_bytes = raw.max_rendered_bytes.unwrap_or(4 * max_body_bytes);
    if max_rendered_bytes < max_body_bytes || max_rendered_bytes > (256 << 20) {
        return Err(ConfigError::new(
            "max_rendered_bytes",
            "must be at least max_body_bytes and at most 268435456",
        ));
    }
    Ok(Limits {
        max_body_bytes: max_body_bytes as usize,
        max_rendered_bytes: max_rendered_bytes as usize,
        forward_record_max_bytes: forward_record_max_bytes as usize,
        log_buffer_bytes: log_buffer_bytes as usize,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bad_values_name_their_key() {
        for (doc, key) in [
            ("forward_record_max_bytes = 0", "forward_record_max_bytes"),
            (
                "forward_record_max_bytes = 16777217",
                "forward_record_max_bytes",
            ),
            ("max_body_bytes = 0", "max_body_bytes"),
            ("max_body_bytes = 67108865", "max_body_bytes"),
            ("log_buffer_bytes = 65535", "log_buffer_bytes"),
            (
                "max_body_bytes = 1024\nmax_rendered_bytes = 1023",
                "max_rendered_bytes",
            ),
        ] {
            let e = Config::parse(doc).unwrap_err();
            assert_eq!(e.key, key, "{doc}: {e}");
        }
        let c = Config::parse("max_body_bytes = 1024").unwrap();
        assert_eq!(c.max_rendered_bytes, 4096, "4 × max_body_bytes by default");
    }
}
