//! `Dinero`: an exact amount in minor units (cents) and a supported currency.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The currencies the platform settles in (`Moneda` in the seed documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Currency {
    #[serde(rename = "USD")]
    Usd,
    #[serde(rename = "EUR")]
    Eur,
    #[serde(rename = "COP")]
    Cop,
}

impl Currency {
    pub const ALL: [Currency; 3] = [Currency::Usd, Currency::Eur, Currency::Cop];

    pub fn code(self) -> &'static str {
        match self {
            Currency::Usd => "USD",
            Currency::Eur => "EUR",
            Currency::Cop => "COP",
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code() == code)
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount must be greater than zero, got {0} minor units")]
    NotPositive(i64),
    #[error("unknown currency {0:?}; supported: USD, EUR, COP")]
    UnknownCurrency(String),
}

/// An amount of money. Amounts are integers in minor units so sums are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    /// A positive amount: what payments, budgets and conversion values must be.
    pub fn positive(amount_minor: i64, currency: &str) -> Result<Money, MoneyError> {
        let currency = currency.parse()?;
        if amount_minor <= 0 {
            return Err(MoneyError::NotPositive(amount_minor));
        }
        Ok(Money {
            amount_minor,
            currency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_positive_amounts_in_known_currencies() {
        let m = Money::positive(10_050, "COP").unwrap();
        assert_eq!(m.amount_minor, 10_050);
        assert_eq!(m.currency, Currency::Cop);
    }

    #[test]
    fn rejects_zero_negative_and_unknown_currency() {
        assert_eq!(Money::positive(0, "USD"), Err(MoneyError::NotPositive(0)));
        assert_eq!(Money::positive(-1, "USD"), Err(MoneyError::NotPositive(-1)));
        assert_eq!(
            Money::positive(5, "GBP"),
            Err(MoneyError::UnknownCurrency("GBP".into()))
        );
    }
}
