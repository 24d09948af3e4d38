/*-------------------------------------------------------------------------
 *
 * testutil.h
 *	  Minimal check macros for the engine unit tests.
 *
 * Each test program counts checks, prints a line per failure, and ends
 * with TEST_SUMMARY(), which prints "N passed, N failed" as its last line
 * and returns non-zero when any check failed.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FLEXMORE_TESTUTIL_H
#define FLEXMORE_TESTUTIL_H

#include <math.h>
#include <stdio.h>

static int	test_passed = 0;
static int	test_failed = 0;

/* Records one check; prints the condition and location when it fails. */
#define CHECK(cond) \
	do { \
		if (cond) \
			test_passed++; \
		else \
		{ \
			test_failed++; \
			printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
		} \
	} while (0)

/* Checks |actual - expected| <= tol, printing both values on failure. */
#define CHECK_NEAR(actual, expected, tol) \
	do { \
		double		check_a_ = (actual); \
		double		check_e_ = (expected); \
		if (fabs(check_a_ - check_e_) <= (tol)) \
			test_passed++; \
		else \
		{ \
			test_failed++; \
			printf("FAIL %s:%d: %s = %.9g, expected %.9g (tolerance %g)\n", \
				   __FILE__, __LINE__, #actual, check_a_, check_e_, (double) (tol)); \
		} \
	} while (0)

#define TEST_SUMMARY() \
	(printf("%d passed, %d failed\n", test_passed, test_failed), test_failed != 0)

#endif							/* FLEXMORE_TESTUTIL_H */
