//! What a runner cost: the hourly price at launch times the time it ran.

/// Estimated cost in the price's currency, to six decimals; `None` if the price is unreadable.
pub fn estimate(hourly_price: &str, seconds: u64) -> Option<String> {
    let hourly: f64 = hourly_price
        .parse()
        .ok()
        .filter(|p: &f64| p.is_finite() && *p >= 0.0)?;
    Some(format!("{:.6}", hourly * seconds as f64 / 3600.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_price_times_hours() {
        assert_eq!(estimate("0.0960000000", 1800).as_deref(), Some("0.048000"));
        assert_eq!(estimate("0.031200", 0).as_deref(), Some("0.000000"));
        assert_eq!(estimate("n/a", 60), None);
        assert_eq!(estimate("-1", 60), None);
    }
}
