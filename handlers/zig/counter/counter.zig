//! The conformance counter in Zig; same behaviour as handlers/rust/counter.
//!
//! Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
//! key's state `seqs` (comma-separated decimals), increments `count` (decimal
//! text) and sets `attempt` to the attempt that succeeded. Optional fields:
//! - `"fail": "retryable" | "permanent"`: return that error, touching
//!   nothing; `"trap"`: trap; `"spin"`: loop until the deadline; `"bomb"`:
//!   allocate until the memory limit.
//! - `"fail_attempts": N`: fail only on attempts 1..=N (then succeed).
//! - `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to topic
//!   T under key K, with the message's headers.
//!
//! Bindings: the C ones from `wit-bindgen c wit --world handler`, generated
//! at build time by scripts/build-polyglot.sh and imported here.

const std = @import("std");
const json = std.json;
const c = @import("handler");

const Allocator = std.mem.Allocator;

/// A handler error: which kind, and its text (allocated with `c_allocator`,
/// because the generated post-return code frees it with `free`).
const Failure = struct {
    tag: u8,
    text: []u8,
};

fn failure(tag: u8, comptime fmt: []const u8, args: anytype) Failure {
    const text = std.fmt.allocPrint(std.heap.c_allocator, fmt, args) catch @trap();
    return .{ .tag = tag, .text = text };
}

fn permanent(comptime fmt: []const u8, args: anytype) Failure {
    return failure(c.ORDO_HANDLER_TYPES_HANDLER_ERROR_PERMANENT, fmt, args);
}

fn retryable(comptime fmt: []const u8, args: anytype) Failure {
    return failure(c.ORDO_HANDLER_TYPES_HANDLER_ERROR_RETRYABLE, fmt, args);
}

fn view(s: c.handler_string_t) []const u8 {
    if (s.len == 0) return "";
    return s.ptr[0..s.len];
}

fn cstr(s: []const u8) c.handler_string_t {
    return .{ .ptr = @constCast(s.ptr), .len = s.len };
}

/// serde_json's `as_u64`: an integer without sign, fraction or exponent
/// that fits in 64 bits (numbers are kept as their source text).
fn asU64(value: ?json.Value) ?u64 {
    const v = value orelse return null;
    const text = switch (v) {
        .number_string => |s| s,
        else => return null,
    };
    for (text) |ch| if (ch < '0' or ch > '9') return null;
    return std.fmt.parseInt(u64, text, 10) catch null;
}

fn asStr(value: ?json.Value) ?[]const u8 {
    const v = value orelse return null;
    return switch (v) {
        .string => |s| s,
        else => null,
    };
}

fn field(value: json.Value, name: []const u8) ?json.Value {
    return switch (value) {
        .object => |o| o.get(name),
        else => null,
    };
}

/// A state value as text, `null` when unset; a value that is not UTF-8 is
/// a permanent failure.
fn stateText(arena: Allocator, key: []const u8, fail: *?Failure) ?[]const u8 {
    var k = cstr(key);
    var value: c.handler_list_u8_t = undefined;
    if (!c.ordo_handler_state_get(&k, &value)) return null;
    defer c.handler_list_u8_free(&value);
    const bytes = if (value.len == 0) "" else value.ptr[0..value.len];
    if (!std.unicode.utf8ValidateSlice(bytes)) {
        fail.* = permanent("state \"{s}\" is not UTF-8 text", .{key});
        return null;
    }
    return arena.dupe(u8, bytes) catch @trap();
}

fn stateSet(key: []const u8, value: []const u8) void {
    var k = cstr(key);
    var v: c.handler_list_u8_t = .{ .ptr = @constCast(value.ptr), .len = value.len };
    c.ordo_handler_state_set(&k, &v);
}

/// Rust's `u64::from_str`: an optional `+`, then decimal digits that fit.
fn parseU64(text: []const u8) ?u64 {
    const digits = if (text.len > 0 and text[0] == '+') text[1..] else text;
    if (digits.len == 0) return null;
    for (digits) |ch| if (ch < '0' or ch > '9') return null;
    return std.fmt.parseInt(u64, digits, 10) catch null;
}

fn writeString(out: *std.ArrayList(u8), gpa: Allocator, s: []const u8) !void {
    const hex = "0123456789abcdef";
    try out.append(gpa, '"');
    for (s) |ch| switch (ch) {
        '"' => try out.appendSlice(gpa, "\\\""),
        '\\' => try out.appendSlice(gpa, "\\\\"),
        0x08 => try out.appendSlice(gpa, "\\b"),
        0x0c => try out.appendSlice(gpa, "\\f"),
        '\n' => try out.appendSlice(gpa, "\\n"),
        '\r' => try out.appendSlice(gpa, "\\r"),
        '\t' => try out.appendSlice(gpa, "\\t"),
        0...0x07, 0x0b, 0x0e...0x1f => try out.appendSlice(gpa, &[_]u8{ '\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15] }),
        else => try out.append(gpa, ch),
    };
    try out.append(gpa, '"');
}

fn keyLess(_: void, a: []const u8, b: []const u8) bool {
    return std.mem.lessThan(u8, a, b);
}

/// Compact JSON with object keys sorted bytewise: what the Rust counter
/// (serde_json's default map) emits. Numbers are written as they came.
fn writeJson(out: *std.ArrayList(u8), gpa: Allocator, value: json.Value) !void {
    switch (value) {
        .null => try out.appendSlice(gpa, "null"),
        .bool => |b| try out.appendSlice(gpa, if (b) "true" else "false"),
        .integer => |i| try out.print(gpa, "{d}", .{i}),
        .float => |f| try out.print(gpa, "{d}", .{f}),
        .number_string => |s| try out.appendSlice(gpa, s),
        .string => |s| try writeString(out, gpa, s),
        .array => |a| {
            try out.append(gpa, '[');
            for (a.items, 0..) |item, i| {
                if (i > 0) try out.append(gpa, ',');
                try writeJson(out, gpa, item);
            }
            try out.append(gpa, ']');
        },
        .object => |o| {
            const keys = try gpa.dupe([]const u8, o.keys());
            std.mem.sort([]const u8, keys, {}, keyLess);
            try out.append(gpa, '{');
            for (keys, 0..) |k, i| {
                if (i > 0) try out.append(gpa, ',');
                try writeString(out, gpa, k);
                try out.append(gpa, ':');
                try writeJson(out, gpa, o.get(k).?);
            }
            try out.append(gpa, '}');
        },
    }
}

fn handle(arena: Allocator, msg: *c.handler_message_t) ?Failure {
    const raw = if (msg.payload.len == 0) "" else msg.payload.ptr[0..msg.payload.len];
    var payload = json.parseFromSliceLeaky(json.Value, arena, raw, .{
        .duplicate_field_behavior = .use_last,
        .parse_numbers = false,
    }) catch |e| return permanent("payload is not the expected JSON: {s}", .{@errorName(e)});

    const seq = asU64(field(payload, "seq")) orelse
        return permanent("payload has no unsigned integer `seq`", .{});
    const failing = if (asU64(field(payload, "fail_attempts"))) |limit| msg.attempt <= limit else true;
    if (failing) if (asStr(field(payload, "fail"))) |fail| {
        if (std.mem.eql(u8, fail, "retryable")) {
            return retryable("seq {d}: asked to fail (retryable), attempt {d}", .{ seq, msg.attempt });
        } else if (std.mem.eql(u8, fail, "permanent")) {
            return permanent("seq {d}: asked to fail (permanent)", .{seq});
        } else if (std.mem.eql(u8, fail, "trap")) {
            @trap();
        } else if (std.mem.eql(u8, fail, "spin")) {
            // Runs until the host's deadline interrupts it.
            var x: u64 = seq;
            while (true) {
                x = x *% 6364136223846793005 +% 1;
                std.mem.doNotOptimizeAway(x);
            }
        } else if (std.mem.eql(u8, fail, "bomb")) {
            // Grows memory until the host's limit stops it.
            while (true) {
                const chunk = std.heap.c_allocator.alloc(u8, 1 << 20) catch @trap();
                @memset(chunk, 1);
                std.mem.doNotOptimizeAway(chunk.ptr);
            }
        }
    };

    var fail: ?Failure = null;
    const old = stateText(arena, "seqs", &fail);
    if (fail) |f| return f;
    const seqs = if (old != null and old.?.len > 0)
        std.fmt.allocPrint(arena, "{s},{d}", .{ old.?, seq }) catch @trap()
    else
        std.fmt.allocPrint(arena, "{d}", .{seq}) catch @trap();
    const count_text = stateText(arena, "count", &fail);
    if (fail) |f| return f;
    var count: u64 = 0;
    if (count_text) |t| {
        count = parseU64(t) orelse
            return permanent("state `count` is not a number: \"{s}\"", .{t});
    }
    count += 1;
    stateSet("seqs", seqs);
    stateSet("count", std.fmt.allocPrint(arena, "{d}", .{count}) catch @trap());
    stateSet("attempt", std.fmt.allocPrint(arena, "{d}", .{msg.attempt}) catch @trap());

    switch (payload) {
        .object => |*o| if (o.get("emit")) |target| {
            _ = o.orderedRemove("emit");
            const topic = asStr(field(target, "topic"));
            const key = asStr(field(target, "key"));
            if (topic == null or key == null) {
                return permanent("`emit` needs string `topic` and `key`", .{});
            }
            var body: std.ArrayList(u8) = .empty;
            writeJson(&body, arena, payload) catch @trap();
            var t = cstr(topic.?);
            var k = cstr(key.?);
            var b: c.handler_list_u8_t = .{ .ptr = body.items.ptr, .len = body.items.len };
            c.ordo_handler_outbox_emit(&t, &k, &b, &msg.headers);
        },
        else => {},
    }

    const line = std.fmt.allocPrint(arena, "key {s} seq {d} count {d}", .{ view(msg.partition_key), seq, count }) catch @trap();
    var text = cstr(line);
    c.ordo_handler_log_log(c.ORDO_HANDLER_LOG_LEVEL_DEBUG, &text);
    return null;
}

export fn exports_handler_handle(msg: *c.handler_message_t, err: *c.handler_handler_error_t) bool {
    var arena_state = std.heap.ArenaAllocator.init(std.heap.c_allocator);
    defer arena_state.deinit();
    defer c.handler_message_free(msg);
    if (handle(arena_state.allocator(), msg)) |f| {
        err.tag = f.tag;
        err.val.permanent = .{ .ptr = f.text.ptr, .len = f.text.len };
        return false;
    }
    return true;
}
