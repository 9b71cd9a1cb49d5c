/* Clock helpers (see time.h). */
#include "base/time.h"

#include <time.h>

uint64_t pn_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int64_t pn_wall_sec(void)
{
    return (int64_t)time(NULL);
}
