#include "utf8.h"

#include <stdio.h>

int utf8_feed(utf8_state_t *st, const void *bytes, size_t len) {
  const uint8_t *s = bytes;
  for (size_t i = 0; i < len; i++) {
    uint8_t b = s[i];
    if (st->need) {
      if (b < st->lo || b > st->hi) return -1;
      st->need--;
      st->lo = 0x80, st->hi = 0xBF;
      continue;
    }
    if (b < 0x80) continue;
    /* The lead byte fixes the length and, for the edges of the ranges, the
     * bounds of the first continuation byte. */
    if (b >= 0xC2 && b <= 0xDF) *st = (utf8_state_t){1, 0x80, 0xBF};
    else if (b == 0xE0) *st = (utf8_state_t){2, 0xA0, 0xBF};      /* no overlongs */
    else if (b == 0xED) *st = (utf8_state_t){2, 0x80, 0x9F};      /* no surrogates */
    else if (b >= 0xE1 && b <= 0xEF) *st = (utf8_state_t){2, 0x80, 0xBF};
    else if (b == 0xF0) *st = (utf8_state_t){3, 0x90, 0xBF};      /* no overlongs */
    else if (b >= 0xF1 && b <= 0xF3) *st = (utf8_state_t){3, 0x80, 0xBF};
    else if (b == 0xF4) *st = (utf8_state_t){3, 0x80, 0x8F};      /* <= U+10FFFF */
    else return -1;
  }
  return 0;
}

int utf8_valid(const void *bytes, size_t len) {
  utf8_state_t st = {0};
  return utf8_feed(&st, bytes, len) == 0 && st.need == 0;
}

/* Length of the valid sequence at s, or 0. */
static size_t sequence_length(const uint8_t *s, size_t len) {
  utf8_state_t st = {0};
  for (size_t i = 0; i < len && i < 4; i++) {
    if (utf8_feed(&st, s + i, 1) != 0) return 0;
    if (st.need == 0) return i + 1;
  }
  return 0;
}

int json_append_string(hstr_t *out, const char *s, size_t len) {
  const uint8_t *p = (const uint8_t *)s;
  int rc = hstr_append(out, "\"", 1);
  size_t i = 0;
  while (i < len) {
    uint8_t b = p[i];
    if (b == '"' || b == '\\') {
      char esc[2] = {'\\', (char)b};
      rc |= hstr_append(out, esc, 2);
      i++;
    } else if (b < 0x20) {
      char esc[8];
      snprintf(esc, sizeof esc, "\\u%04x", b);
      rc |= hstr_append(out, esc, 6);
      i++;
    } else if (b < 0x80) {
      size_t run = i + 1;
      while (run < len && p[run] >= 0x20 && p[run] < 0x80 && p[run] != '"' && p[run] != '\\') run++;
      rc |= hstr_append(out, s + i, run - i);
      i = run;
    } else {
      size_t n = sequence_length(p + i, len - i);
      if (n) rc |= hstr_append(out, s + i, n);
      else rc |= hstr_append(out, "\xEF\xBF\xBD", 3);
      i += n ? n : 1;
    }
  }
  rc |= hstr_append(out, "\"", 1);
  return rc ? -1 : 0;
}
