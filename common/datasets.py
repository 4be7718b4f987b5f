"""Seeded data sets for demos and tests: PaySim-style mobile-money transactions.

The generator follows PaySim's columns and its fraud pattern: a TRANSFER that empties
the origin account, followed by a CASH_OUT of the same amount from the receiving account.

Example::

    frame = paysim(10_000, seed=7)
    frame.to_csv("transactions.csv", index=False)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TYPES = np.array(["CASH_IN", "CASH_OUT", "DEBIT", "PAYMENT", "TRANSFER"])
TYPE_SHARES = np.array([0.22, 0.35, 0.01, 0.34, 0.08])
TYPE_AMOUNT_MU = np.array([11.5, 11.7, 8.5, 8.9, 12.8])  # log-amount means, as in PaySim
HOURS = 24 * 31
START = pd.Timestamp("2026-01-01T00:00:00Z")
FLAG_THRESHOLD = 200_000.0
EMPTYING_SHARE = 0.15


def paysim(rows: int, seed: int = 0, fraud_rate: float = 0.01) -> pd.DataFrame:
    """``rows`` transactions sorted by time; ``fraud_rate`` of them are fraudulent."""
    rng = np.random.default_rng(seed)
    pairs = int(rows * fraud_rate / 2)
    frame = pd.concat(
        [_normal(rng, rows - 2 * pairs), *_fraud_pairs(rng, pairs)], ignore_index=True
    )
    frame["isFlaggedFraud"] = (
        (frame["type"] == "TRANSFER") & (frame["amount"] > FLAG_THRESHOLD)
    ).astype(int)
    frame["timestamp"] = START + pd.to_timedelta(frame["step"], unit="h")
    return frame.sort_values(["step", "nameOrig"], kind="stable").reset_index(drop=True)


def _accounts(rng: np.random.Generator, n: int, prefix: str = "C") -> np.ndarray:
    return np.char.add(prefix, rng.integers(10**8, 10**9, n).astype(str))


def _normal(rng: np.random.Generator, n: int) -> pd.DataFrame:
    kind = rng.choice(len(TYPES), n, p=TYPE_SHARES)
    amount = np.round(rng.lognormal(TYPE_AMOUNT_MU[kind], 1.0), 2)
    old_orig = np.round(rng.lognormal(10.5, 2.0, n) * (rng.random(n) > 0.3), 2)
    # Honest customers empty their accounts too, now and then (a fraud-like look-alike).
    empties = np.isin(TYPES[kind], ["TRANSFER", "CASH_OUT"]) & (rng.random(n) < EMPTYING_SHARE)
    old_orig = np.where(empties, amount, old_orig)
    credit = TYPES[kind] == "CASH_IN"
    new_orig = np.where(credit, old_orig + amount, np.maximum(old_orig - amount, 0.0))
    merchant = TYPES[kind] == "PAYMENT"
    old_dest = np.where(merchant, 0.0, np.round(rng.lognormal(11.0, 2.0, n), 2))
    new_dest = np.where(merchant, 0.0, np.where(credit, np.maximum(old_dest - amount, 0.0),
                                                 old_dest + amount))
    dest = np.where(merchant, _accounts(rng, n, "M"), _accounts(rng, n))
    return pd.DataFrame({
        "step": rng.integers(0, HOURS, n), "type": TYPES[kind], "amount": amount,
        "nameOrig": _accounts(rng, n), "oldbalanceOrg": old_orig, "newbalanceOrig": new_orig,
        "nameDest": dest, "oldbalanceDest": old_dest, "newbalanceDest": new_dest, "isFraud": 0,
    })


def _fraud_pairs(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    night = rng.integers(0, 31, n) * 24 + rng.integers(0, 7, n)  # fraud favours the night
    amount = np.round(rng.lognormal(12.5, 1.2, n), 2)
    # Most frauds empty the account; careful fraudsters leave a little behind.
    balance = np.where(rng.random(n) < 0.8, amount, np.round(amount / rng.uniform(0.6, 0.95, n), 2))
    victim, mule = _accounts(rng, n), _accounts(rng, n)
    transfer = pd.DataFrame({
        "step": night, "type": "TRANSFER", "amount": amount, "nameOrig": victim,
        "oldbalanceOrg": balance, "newbalanceOrig": balance - amount, "nameDest": mule,
        "oldbalanceDest": 0.0, "newbalanceDest": 0.0, "isFraud": 1,
    })
    cash_out = transfer.assign(
        step=np.minimum(night + rng.integers(0, 2, n), HOURS - 1), type="CASH_OUT",
        nameOrig=mule, nameDest=_accounts(rng, n), oldbalanceDest=np.round(
            rng.lognormal(11.0, 2.0, n), 2),
    )
    cash_out["newbalanceDest"] = cash_out["oldbalanceDest"] + amount
    return transfer, cash_out
