/* utf8: incremental UTF-8 validation (RFC 3629: no overlongs, no surrogates,
 * nothing above U+10FFFF) and JSON string escaping. */
#ifndef HERALD_UTF8_H
#define HERALD_UTF8_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* Where a validation stopped: need continuation bytes are still due, the
 * next within [lo, hi]. Zeroed: at a character boundary. */
typedef struct utf8_state {
  uint8_t need, lo, hi;
} utf8_state_t;

/* Feeds bytes; 0 while they can still be valid UTF-8, -1 at the first byte
 * that cannot (so a bad fragment fails before its message ends). */
int utf8_feed(utf8_state_t *st, const void *bytes, size_t len);

/* Whole-string check: valid and complete. */
int utf8_valid(const void *bytes, size_t len);

/* Appends bytes as a JSON string (quotes included); invalid UTF-8 becomes
 * U+FFFD. Returns 0 or -1 (ENOMEM). */
int json_append_string(hstr_t *out, const char *s, size_t len);

#endif
