/* Clocks: monotonic milliseconds for deadlines and intervals, wall-clock
 * seconds for what panels see. */
#ifndef PN_BASE_TIME_H
#define PN_BASE_TIME_H

#include <stdint.h>

uint64_t pn_now_ms(void);   /* CLOCK_MONOTONIC */
int64_t pn_wall_sec(void);  /* CLOCK_REALTIME, unix seconds */

#endif
