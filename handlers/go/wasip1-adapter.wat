;; The WASI preview1 functions that Go's wasip1 runtime imports, implemented
;; without the host: no arguments, no environment, no files, output
;; discarded, a deterministic clock and random source. Used in place of the
;; standard preview1 adapter, which allocates its state through the module's
;; `cabi_realloc` during `_initialize` — before Go's runtime is up, so that
;; call cannot be served by Go. The handler talks to the host only through
;; the ordo world (state, outbox, log).
(module
  (import "env" "memory" (memory 0))

  ;; Nanoseconds; advances 1 µs per reading and by every sleep.
  (global $now (mut i64) (i64.const 1))
  (global $seed (mut i64) (i64.const 0x2545f4914f6cdd1d))

  (func (export "args_sizes_get") (param $argc i32) (param $size i32) (result i32)
    (i32.store (local.get $argc) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))
  (func (export "args_get") (param i32 i32) (result i32) (i32.const 0))
  (func (export "environ_sizes_get") (param $count i32) (param $size i32) (result i32)
    (i32.store (local.get $count) (i32.const 0))
    (i32.store (local.get $size) (i32.const 0))
    (i32.const 0))
  (func (export "environ_get") (param i32 i32) (result i32) (i32.const 0))

  (func (export "clock_time_get") (param $id i32) (param $precision i64) (param $out i32) (result i32)
    (global.set $now (i64.add (global.get $now) (i64.const 1000)))
    (i64.store (local.get $out) (global.get $now))
    (i32.const 0))

  ;; xorshift64*: deterministic bytes.
  (func (export "random_get") (param $buf i32) (param $len i32) (result i32)
    (local $x i64)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $len)))
        (local.set $x (global.get $seed))
        (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 12))))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 25))))
        (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 27))))
        (global.set $seed (local.get $x))
        (i32.store8 (local.get $buf)
          (i32.wrap_i64 (i64.shr_u (i64.mul (local.get $x) (i64.const 0x2545f4914f6cdd1d)) (i64.const 56))))
        (local.set $buf (i32.add (local.get $buf) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; Output is discarded (counted as written); a handler logs through the
  ;; ordo `log` interface instead.
  (func (export "fd_write") (param $fd i32) (param $iovs i32) (param $n i32) (param $written i32) (result i32)
    (local $total i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $total (i32.add (local.get $total) (i32.load offset=4 (local.get $iovs))))
        (local.set $iovs (i32.add (local.get $iovs) (i32.const 8)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))
    (i32.store (local.get $written) (local.get $total))
    (i32.const 0))
  ;; Standard input is empty.
  (func (export "fd_read") (param i32 i32 i32) (param $read i32) (result i32)
    (i32.store (local.get $read) (i32.const 0))
    (i32.const 0))
  (func (export "fd_close") (param i32) (result i32) (i32.const 0))
  ;; fds 0-2 are character devices; nothing else exists (errno 8: badf).
  (func (export "fd_fdstat_get") (param $fd i32) (param $out i32) (result i32)
    (if (i32.gt_u (local.get $fd) (i32.const 2)) (then (return (i32.const 8))))
    (i64.store (local.get $out) (i64.const 2))
    (i64.store offset=8 (local.get $out) (i64.const 0))
    (i64.store offset=16 (local.get $out) (i64.const 0))
    (i32.const 0))
  (func (export "fd_fdstat_set_flags") (param $fd i32) (param i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $fd) (i32.const 2))
      (then (i32.const 8)) (else (i32.const 0))))
  ;; No preopened directories.
  (func (export "fd_prestat_get") (param i32 i32) (result i32) (i32.const 8))
  (func (export "fd_prestat_dir_name") (param i32 i32 i32) (result i32) (i32.const 8))

  ;; Every subscription fires at once; a clock subscription advances the
  ;; clock by its timeout (a sleep takes no time).
  (func (export "poll_oneoff") (param $in i32) (param $out i32) (param $n i32) (param $events i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i64.store (local.get $out) (i64.load (local.get $in)))
        (i32.store16 offset=8 (local.get $out) (i32.const 0))
        (i32.store8 offset=10 (local.get $out) (i32.load8_u offset=8 (local.get $in)))
        (i64.store offset=16 (local.get $out) (i64.const 0))
        (i64.store offset=24 (local.get $out) (i64.const 0))
        (if (i32.eqz (i32.load8_u offset=8 (local.get $in)))
          (then (global.set $now (i64.add (global.get $now) (i64.load offset=24 (local.get $in))))))
        (local.set $in (i32.add (local.get $in) (i32.const 48)))
        (local.set $out (i32.add (local.get $out) (i32.const 32)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (local.get $events) (local.get $n))
    (i32.const 0))
  (func (export "sched_yield") (result i32) (i32.const 0))
  ;; Exiting (e.g. after a panic) is a trap.
  (func (export "proc_exit") (param i32) unreachable)
)
