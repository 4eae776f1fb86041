// The canonical-ABI glue between the `ordo:handler/handler` world and Go's
// wasip1 port: imports via go:wasmimport, the `handle` export and
// `cabi_realloc` via go:wasmexport. Go has no component bindings generator,
// so this file is the hand-written equivalent (the world is small).
package main

import (
	"runtime"
	"unsafe"
)

// Memory handed to the host (argument lists, strings) must not move or be
// collected while the host uses it. Go's collector does not move objects, so
// keeping a reference until the next message is enough; an instance serves
// one message.
var pinned [][]byte

func alloc(size, align uint32) []byte {
	if size == 0 {
		return nil
	}
	// Over-allocate so an aligned start can always be found.
	buf := make([]byte, size+align)
	pinned = append(pinned, buf)
	base := uintptr(unsafe.Pointer(&buf[0]))
	offset := (uintptr(align) - base%uintptr(align)) % uintptr(align)
	return buf[offset : offset+uintptr(size)]
}

func addr(b []byte) uint32 {
	if len(b) == 0 {
		return 0
	}
	return uint32(uintptr(unsafe.Pointer(&b[0])))
}

func strAddr(s string) (uint32, uint32) {
	if len(s) == 0 {
		return 0, 0
	}
	return uint32(uintptr(unsafe.Pointer(unsafe.StringData(s)))), uint32(len(s))
}

//go:wasmexport cabi_realloc
func cabiRealloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	if align == 0 {
		align = 1
	}
	buf := alloc(newSize, align)
	if oldPtr != 0 && oldSize != 0 {
		old := unsafe.Slice((*byte)(unsafe.Pointer(uintptr(oldPtr))), oldSize)
		copy(buf, old)
	}
	if len(buf) == 0 {
		return align
	}
	return addr(buf)
}

func bytesAt(ptr, length uint32) []byte {
	if length == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(uintptr(ptr))), length)
}

func stringAt(ptr, length uint32) string {
	return string(bytesAt(ptr, length))
}

// Message is one message as delivered to a handler.
type Message struct {
	Topic          string
	PartitionKey   string
	IdempotencyKey string
	Offset         uint64
	Payload        []byte
	Headers        [][2]string
	Attempt        uint32
}

// HandlerError is `retryable(string)` or `permanent(string)`.
type HandlerError struct {
	Retryable bool
	Text      string
}

func (e *HandlerError) Error() string { return e.Text }

// Retryable is retried with backoff.
func Retryable(text string) *HandlerError { return &HandlerError{Retryable: true, Text: text} }

// Permanent dead-letters the message.
func Permanent(text string) *HandlerError { return &HandlerError{Retryable: false, Text: text} }

// The result area of `handle`: result<_, handler-error>.
var resultArea [16]byte

//go:wasmexport handle
func handleExport(topicPtr, topicLen, keyPtr, keyLen, idemPtr, idemLen uint32, offset uint64,
	payloadPtr, payloadLen, headersPtr, headersLen, attempt uint32) uint32 {
	msg := Message{
		Topic:          stringAt(topicPtr, topicLen),
		PartitionKey:   stringAt(keyPtr, keyLen),
		IdempotencyKey: stringAt(idemPtr, idemLen),
		Offset:         offset,
		Payload:        append([]byte(nil), bytesAt(payloadPtr, payloadLen)...),
		Attempt:        attempt,
	}
	// Each header is a tuple<string, string>: four u32s.
	raw := bytesAt(headersPtr, headersLen*16)
	for i := uint32(0); i < headersLen; i++ {
		w := func(j uint32) uint32 {
			b := raw[i*16+j*4:]
			return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
		}
		msg.Headers = append(msg.Headers, [2]string{stringAt(w(0), w(1)), stringAt(w(2), w(3))})
	}
	err := handle(msg)
	area := &resultArea
	*area = [16]byte{}
	if err != nil {
		area[0] = 1
		if !err.Retryable {
			area[4] = 1
		}
		text := alloc(uint32(len(err.Text)), 1)
		copy(text, err.Text)
		putU32(area[8:], addr(text))
		putU32(area[12:], uint32(len(err.Text)))
	}
	return addr(area[:])
}

func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

func getU32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

//go:wasmimport ordo:handler/state@0.1.0 get
func stateGet(keyPtr, keyLen, retPtr uint32)

//go:wasmimport ordo:handler/state@0.1.0 set
func stateSet(keyPtr, keyLen, valuePtr, valueLen uint32)

//go:wasmimport ordo:handler/state@0.1.0 delete
func stateDelete(keyPtr, keyLen uint32)

//go:wasmimport ordo:handler/outbox@0.1.0 emit
func outboxEmit(topicPtr, topicLen, keyPtr, keyLen, payloadPtr, payloadLen, headersPtr, headersLen uint32)

//go:wasmimport ordo:handler/log@0.1.0 log
func logLog(level, msgPtr, msgLen uint32)

// StateGet returns the current key's state `key`, if set.
func StateGet(key string) ([]byte, bool) {
	ret := alloc(12, 4)
	p, n := strAddr(key)
	stateGet(p, n, addr(ret))
	runtime.KeepAlive(key)
	if ret[0] == 0 {
		return nil, false
	}
	value := append([]byte{}, bytesAt(getU32(ret[4:]), getU32(ret[8:]))...)
	return value, true
}

// StateSet sets the current key's state `key`.
func StateSet(key string, value []byte) {
	p, n := strAddr(key)
	stateSet(p, n, addr(value), uint32(len(value)))
	runtime.KeepAlive(key)
	runtime.KeepAlive(value)
}

// StateDelete removes the current key's state `key`.
func StateDelete(key string) {
	p, n := strAddr(key)
	stateDelete(p, n)
	runtime.KeepAlive(key)
}

// Emit buffers an outgoing message; it is published after the commit.
func Emit(topic, key string, payload []byte, headers [][2]string) {
	list := alloc(uint32(16*len(headers)), 4)
	for i, h := range headers {
		kp, kn := strAddr(h[0])
		vp, vn := strAddr(h[1])
		putU32(list[i*16:], kp)
		putU32(list[i*16+4:], kn)
		putU32(list[i*16+8:], vp)
		putU32(list[i*16+12:], vn)
	}
	tp, tn := strAddr(topic)
	kp, kn := strAddr(key)
	outboxEmit(tp, tn, kp, kn, addr(payload), uint32(len(payload)), addr(list), uint32(len(headers)))
	runtime.KeepAlive(topic)
	runtime.KeepAlive(key)
	runtime.KeepAlive(payload)
	runtime.KeepAlive(headers)
}

// Log levels of the `log` interface.
const (
	LevelTrace uint32 = iota
	LevelDebug
	LevelInfo
	LevelWarn
	LevelError
)

// Log writes a line to the host log.
func Log(level uint32, message string) {
	p, n := strAddr(message)
	logLog(level, p, n)
	runtime.KeepAlive(message)
}

func main() {}
