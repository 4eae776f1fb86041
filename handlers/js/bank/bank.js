// A bank in JavaScript; same behaviour as handlers/rust/bank.
//
// One account per partition key, kept in state `account` as JSON
// `{"balance":i64,"deposits":u64,"withdrawals":u64,"transfers_out":u64}`.
// Commands (JSON payload):
// - `{"op":"deposit","amount":N}` (optionally `"transfer_from"`)
// - `{"op":"withdraw","amount":N}`: more than the balance is a permanent error
// - `{"op":"transfer","amount":N,"to":"<account>"}`: withdraws here and emits
//   a deposit for `to` on the same topic (header `ordo-transfer-id` = this
//   message's idempotency key)
// `amount` must be a positive integer. Amounts are JavaScript numbers:
// exact up to 2^53.

import * as state from "ordo:handler/state@0.1.0";
import { emit } from "ordo:handler/outbox@0.1.0";
import { log } from "ordo:handler/log@0.1.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });
const FIELDS = ["balance", "deposits", "withdrawals", "transfers_out"];

// Throwing `{ tag, val }` from an export returning `result` returns `err`.
const permanent = (text) => ({ tag: "permanent", val: text });

function parse(bytes, what) {
  try {
    return JSON.parse(decoder.decode(bytes));
  } catch (e) {
    throw permanent(`${what} is not the expected JSON: ${e.message}`);
  }
}

function command(payload) {
  const cmd = parse(payload, "payload");
  const bad = (why) => permanent(`payload is not the expected JSON: ${why}`);
  if (cmd === null || typeof cmd !== "object" || !["deposit", "withdraw", "transfer"].includes(cmd.op)) {
    throw bad("`op` must be deposit, withdraw or transfer");
  }
  if (!Number.isSafeInteger(cmd.amount)) throw bad("`amount` must be an integer");
  if (cmd.op === "transfer" && typeof cmd.to !== "string") throw bad("`to` must be a string");
  if (cmd.op === "deposit" && cmd.transfer_from != null && typeof cmd.transfer_from !== "string") {
    throw bad("`transfer_from` must be a string");
  }
  return cmd;
}

function loadAccount() {
  const raw = state.get("account");
  if (raw === undefined) return { balance: 0, deposits: 0, withdrawals: 0, transfers_out: 0 };
  const account = parse(raw, 'state "account"');
  if (account === null || typeof account !== "object" || !FIELDS.every((f) => Number.isSafeInteger(account[f]))) {
    throw permanent('state "account" is not the expected JSON');
  }
  return account;
}

function positive(amount) {
  if (amount <= 0) throw permanent(`amount must be positive, got ${amount}`);
  return amount;
}

function withdraw(account, amount) {
  if (amount > account.balance) {
    throw permanent(`insufficient funds: balance ${account.balance}, asked ${amount}`);
  }
  account.balance -= amount;
}

export function handle(msg) {
  const cmd = command(msg.payload);
  const account = loadAccount();
  const amount = positive(cmd.amount);
  if (cmd.op === "deposit") {
    if (!Number.isSafeInteger(account.balance + amount)) throw permanent("balance overflow");
    account.balance += amount;
    account.deposits += 1;
    if (cmd.transfer_from != null) {
      log("debug", `${msg.partitionKey} credited ${amount} from ${cmd.transfer_from}`);
    }
  } else if (cmd.op === "withdraw") {
    withdraw(account, amount);
    account.withdrawals += 1;
  } else {
    if (cmd.to === "" || cmd.to === msg.partitionKey) {
      throw permanent("transfer needs another account in `to`");
    }
    withdraw(account, amount);
    account.transfers_out += 1;
    const deposit = { op: "deposit", amount, transfer_from: msg.partitionKey };
    emit(msg.topic, cmd.to, encoder.encode(JSON.stringify(deposit)), [
      ["ordo-transfer-id", msg.idempotencyKey],
    ]);
  }
  // Field order as the Rust bank writes it.
  const ordered = Object.fromEntries(FIELDS.map((f) => [f, account[f]]));
  state.set("account", encoder.encode(JSON.stringify(ordered)));
}
