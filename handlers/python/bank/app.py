"""A bank in Python; same behaviour as handlers/rust/bank.

One account per partition key, kept in state `account` as JSON
`{"balance":i64,"deposits":u64,"withdrawals":u64,"transfers_out":u64}`.
Commands (JSON payload):
- `{"op":"deposit","amount":N}` (optionally `"transfer_from"`)
- `{"op":"withdraw","amount":N}`: more than the balance is a permanent error
- `{"op":"transfer","amount":N,"to":"<account>"}`: withdraws here and emits
  a deposit for `to` on the same topic (header `ordo-transfer-id` = this
  message's idempotency key)
`amount` must be a positive integer.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, outbox, state
from wit_world.imports.types import HandlerError_Permanent, Message

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
FIELDS = ("balance", "deposits", "withdrawals", "transfers_out")


def permanent(text: str) -> Err:
    return Err(HandlerError_Permanent(text))


def is_int(value, low=I64_MIN, high=I64_MAX) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def command(payload: bytes) -> dict:
    try:
        cmd = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise permanent(f"payload is not the expected JSON: {e}")
    if not isinstance(cmd, dict) or cmd.get("op") not in ("deposit", "withdraw", "transfer"):
        raise permanent("payload is not the expected JSON: `op` must be deposit, withdraw or transfer")
    if not is_int(cmd.get("amount")):
        raise permanent("payload is not the expected JSON: `amount` must be an integer")
    if cmd["op"] == "transfer" and not isinstance(cmd.get("to"), str):
        raise permanent("payload is not the expected JSON: `to` must be a string")
    source = cmd.get("transfer_from")
    if cmd["op"] == "deposit" and source is not None and not isinstance(source, str):
        raise permanent("payload is not the expected JSON: `transfer_from` must be a string")
    return cmd


def load_account() -> dict:
    raw = state.get("account")
    if raw is None:
        return {name: 0 for name in FIELDS}
    try:
        account = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise permanent(f"state \"account\" is not the expected JSON: {e}")
    if not isinstance(account, dict) or not all(is_int(account.get(f)) for f in FIELDS):
        raise permanent("state \"account\" is not the expected JSON")
    return account


def positive(amount: int) -> int:
    if amount <= 0:
        raise permanent(f"amount must be positive, got {amount}")
    return amount


def withdraw(account: dict, amount: int) -> None:
    if amount > account["balance"]:
        raise permanent(
            f"insufficient funds: balance {account['balance']}, asked {amount}"
        )
    account["balance"] -= amount


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class WitWorld(wit_world.WitWorld):
    def handle(self, msg: Message) -> None:
        cmd = command(msg.payload)
        account = load_account()
        amount = positive(cmd["amount"])
        if cmd["op"] == "deposit":
            if account["balance"] + amount > I64_MAX:
                raise permanent("balance overflow")
            account["balance"] += amount
            account["deposits"] += 1
            if cmd.get("transfer_from") is not None:
                log.log(
                    log.Level.DEBUG,
                    f"{msg.partition_key} credited {amount} from {cmd['transfer_from']}",
                )
        elif cmd["op"] == "withdraw":
            withdraw(account, amount)
            account["withdrawals"] += 1
        else:
            to = cmd["to"]
            if not to or to == msg.partition_key:
                raise permanent("transfer needs another account in `to`")
            withdraw(account, amount)
            account["transfers_out"] += 1
            deposit = {"op": "deposit", "amount": amount, "transfer_from": msg.partition_key}
            outbox.emit(
                msg.topic, to, compact(deposit), [("ordo-transfer-id", msg.idempotency_key)]
            )
        # Field order as the Rust bank writes it.
        state.set("account", compact({name: account[name] for name in FIELDS}))
