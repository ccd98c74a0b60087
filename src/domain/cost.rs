//! What a runner cost: the hourly price at launch times the time it ran.

/// Estimated cost in the price's currency, to six decimals; `None` if the price is unreadable.
pub fn estimate(hourly_price: &str, seconds: u64) -> Option<String> {
    let hourly: f64 = hourly_price
        .parse()
        .ok()
        .filter(|p: &f64| p.is_finite() && *p >= 0.0)?;
    Some(format!("{:.6}", hourly * seconds as f64 / 3600.0))
}

/// Hours in the month EBS prices are quoted for: AWS prices a GB-month as 730 hours.
const HOURS_PER_MONTH: f64 = 730.0;

/// What `volumes` volumes of `gib` GiB each cost an hour at `per_gib_month` (the EBS price of
/// their type, per GB-month), to six decimals; `None` if the price is unreadable.
pub fn volumes_hourly(per_gib_month: &str, gib: i32, volumes: i32) -> Option<String> {
    let price: f64 = per_gib_month
        .parse()
        .ok()
        .filter(|p: &f64| p.is_finite() && *p >= 0.0)?;
    let hourly = price * f64::from(gib.max(0)) * f64::from(volumes.max(0)) / HOURS_PER_MONTH;
    Some(format!("{hourly:.6}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_volumes_cost_their_gib_months_by_the_hour() {
        // Three 40 GiB gp3 volumes at 0.08 USD per GB-month: 9.60 a month, 0.013151 an hour.
        assert_eq!(volumes_hourly("0.08", 40, 3).as_deref(), Some("0.013151"));
        assert_eq!(volumes_hourly("0.08", 40, 0).as_deref(), Some("0.000000"));
        assert_eq!(volumes_hourly("free", 40, 3), None);
    }

    #[test]
    fn cost_is_price_times_hours() {
        assert_eq!(estimate("0.0960000000", 1800).as_deref(), Some("0.048000"));
        assert_eq!(estimate("0.031200", 0).as_deref(), Some("0.000000"));
        assert_eq!(estimate("n/a", 60), None);
        assert_eq!(estimate("-1", 60), None);
    }
}
