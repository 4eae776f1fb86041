//! A bank: one account per partition key, balances in state as JSON.
//!
//! Commands (JSON payload):
//! - `{"op":"deposit","amount":N}` (optionally `"transfer_from"`)
//! - `{"op":"withdraw","amount":N}`: more than the balance is a permanent error
//! - `{"op":"transfer","amount":N,"to":"<account>"}`: withdraws here and emits
//!   a deposit for `to` on the same topic (header `ordo-transfer-id` = this
//!   message's idempotency key)
//!
//! `amount` must be a positive integer. State key `account`:
//! `{"balance":i64,"deposits":u64,"withdrawals":u64,"transfers_out":u64}`.

use ordo_guest::serde::{Deserialize, Serialize};
use ordo_guest::{debug, export_handler, outbox, state, Handler, HandlerError, Message};

#[derive(Default, Serialize, Deserialize)]
#[serde(crate = "ordo_guest::serde")]
struct Account {
    balance: i64,
    deposits: u64,
    withdrawals: u64,
    transfers_out: u64,
}

#[derive(Deserialize)]
#[serde(crate = "ordo_guest::serde", tag = "op", rename_all = "lowercase")]
enum Command {
    Deposit {
        amount: i64,
        #[serde(default)]
        transfer_from: Option<String>,
    },
    Withdraw {
        amount: i64,
    },
    Transfer {
        amount: i64,
        to: String,
    },
}

#[derive(Serialize)]
#[serde(crate = "ordo_guest::serde")]
struct Deposit<'a> {
    op: &'static str,
    amount: i64,
    transfer_from: &'a str,
}

fn positive(amount: i64) -> Result<i64, HandlerError> {
    if amount > 0 {
        Ok(amount)
    } else {
        Err(HandlerError::permanent(format!(
            "amount must be positive, got {amount}"
        )))
    }
}

fn withdraw(account: &mut Account, amount: i64) -> Result<(), HandlerError> {
    if amount > account.balance {
        return Err(HandlerError::permanent(format!(
            "insufficient funds: balance {}, asked {amount}",
            account.balance
        )));
    }
    account.balance -= amount;
    Ok(())
}

struct Bank;

impl Handler for Bank {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let command: Command = msg.payload_json()?;
        let mut account: Account = state::get_json("account")?.unwrap_or_default();
        match command {
            Command::Deposit {
                amount,
                transfer_from,
            } => {
                let amount = positive(amount)?;
                account.balance = account
                    .balance
                    .checked_add(amount)
                    .ok_or_else(|| HandlerError::permanent("balance overflow"))?;
                account.deposits += 1;
                if let Some(from) = transfer_from {
                    debug!("{} credited {amount} from {from}", msg.partition_key);
                }
            }
            Command::Withdraw { amount } => {
                withdraw(&mut account, positive(amount)?)?;
                account.withdrawals += 1;
            }
            Command::Transfer { amount, to } => {
                let amount = positive(amount)?;
                if to.is_empty() || to == msg.partition_key {
                    return Err(HandlerError::permanent(
                        "transfer needs another account in `to`",
                    ));
                }
                withdraw(&mut account, amount)?;
                account.transfers_out += 1;
                let headers = [("ordo-transfer-id".to_string(), msg.idempotency_key.clone())];
                let deposit = Deposit {
                    op: "deposit",
                    amount,
                    transfer_from: &msg.partition_key,
                };
                outbox::emit_json(&msg.topic, &to, &deposit, &headers)?;
            }
        }
        state::set_json("account", &account)?;
        Ok(())
    }
}

export_handler!(Bank);
