/*-------------------------------------------------------------------------
 *
 * kernels_amx.c
 *	  The bf16 product kernel of the "amx" kernel set (Intel AMX,
 *	  TDPBF16PS), and the check that the CPU and the OS let this process
 *	  use AMX.
 *
 * A bf16 panel (fm_weight_format in engine.h) is already the B operand
 * TDPBF16PS takes: 16 consecutive column pairs of a panel are 16 rows of
 * 64 bytes, each row the pairs of the panel's 16 output rows.  Encoded
 * activation rows (fm_mm_job) give the A operand: up to 16 rows of 16
 * column pairs.  The C tile then contains 16 activation rows by the 16
 * outputs of the panel, in fp32.
 *
 * Order of sums.  Each output is accumulated over the column pairs in
 * blocks of 16, in increasing order, and a block short of 16 pairs (the
 * last, when cols is not a multiple of 32) is padded with zeros.  Within
 * a block the instruction sums in its own order, so most outputs differ
 * in the last bits from the avx512bf16 set's VDPBF16PS sums.  In a
 * 16 x 4096 x 4096 product on a Xeon of CPUID family 6, model 207, 93%
 * of the outputs differed.  A row of C
 * depends only on that row of A and on B, so a row gets the same bits
 * whichever tile, row count or thread range it lands in.  To keep that
 * contract for decoding too, the amx set uses this kernel for every row
 * count, one row included.
 *
 * Every function carries a target attribute, so the file builds without
 * -mamx flags; formats.c calls the kernel only after fm_amx_request has
 * returned true in this process.
 *
 *-------------------------------------------------------------------------
 */
#if defined(__x86_64__)

#include <asm/prctl.h>
#include <cpuid.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/kernels.h"

/* Older Linux headers lack this code.  A kernel without AMX support rejects it. */
#ifndef ARCH_REQ_XCOMP_PERM
#define ARCH_REQ_XCOMP_PERM		0x1023
#endif
/* XSTATE component 18, the tile data (Linux's Documentation/arch/x86/xstate.rst) */
#define XFEATURE_XTILEDATA		18

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#define INLINE inline __attribute__((always_inline))

/*
 * GCC 12's tile load and store intrinsics are asm statements without a
 * memory operand, so the compiler may move plain stores past a tile load,
 * or plain loads before a tile store.  This barrier orders them where a
 * tile reads or writes a buffer this file also touches with plain C.
 */
#define MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

/* Column pairs per K block: the 64-byte rows of A and B. */
#define PAIRS_PER_BLOCK 16

/* ---------- CPU and OS support ---------- */

static int	amx_state = -1;

/*
 * Bytes of encoded activations (all rows of one K chunk) meant to stay in
 * the L2 cache while the panels stream past them: a quarter of the L2,
 * leaving room for the weights and outputs.  The chunking never changes
 * a result (see LOAD_C), only the speed.
 */
static size_t a_chunk_bytes = (size_t) 512 * 1024;

/* True if the CPU has AMX-TILE and AMX-BF16 and the OS enabled both tile XSTATE components. */
static bool
amx_supported(void)
{
	unsigned int eax,
				ebx,
				ecx,
				edx;
	unsigned int xcr0_lo,
				xcr0_hi;

	if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27)))	/* OSXSAVE */
		return false;
	if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
		return false;
	if (!(edx & (1u << 24)) || !(edx & (1u << 22)))	/* AMX-TILE, AMX-BF16 */
		return false;
	__asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
	(void) xcr0_hi;
	/* XTILECFG (bit 17) and XTILEDATA (bit 18) */
	return (xcr0_lo & (3u << 17)) == (3u << 17);
}

/* Returns the bytes of the L2 cache from CPUID leaf 4, or 0 if it lists none. */
static size_t
l2_cache_bytes(void)
{
	unsigned int eax,
				ebx,
				ecx,
				edx;

	for (unsigned int i = 0; i < 16; i++)
	{
		if (!__get_cpuid_count(4, i, &eax, &ebx, &ecx, &edx) || (eax & 0x1f) == 0)
			break;
		/* a data (1) or unified (3) cache of level 2 */
		if (((eax >> 5) & 7) == 2 && (eax & 0x1f) != 2)
			return (size_t) ((ebx >> 22) + 1) * (((ebx >> 12) & 0x3ff) + 1) *
				((ebx & 0xfff) + 1) * ((size_t) ecx + 1);
	}
	return 0;
}

/*
 * Linux traps the first tile instruction of a process that has not
 * requested the tile data state with arch_prctl(ARCH_REQ_XCOMP_PERM), and
 * kills it.  The kernel may reject the request: a kernel without AMX
 * support, a sigaltstack too small for the signal frame with 8 KiB of
 * tile data, or a seccomp filter.  Then the engine keeps the avx512bf16
 * kernels, which need no permission, so a rejection costs speed and
 * nothing else.  The permission is per process and inherited by fork(),
 * so one request covers the compute threads and child processes.
 *
 * The result is cached in a plain static: call this from normal code on
 * the engine's thread (formats.c does, at the first product), never from
 * a signal handler.
 */
bool
fm_amx_request(void)
{
	if (amx_state < 0)
	{
		size_t		l2 = l2_cache_bytes();

		amx_state = amx_supported() &&
			syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
		if (l2 >= (size_t) 256 * 1024)
			a_chunk_bytes = l2 / 4;
	}
	return amx_state == 1;
}

/* ---------- tile configuration ---------- */

/*
 * The 64-byte operand of LDTILECFG, palette 1: colsb and rows per tile.
 * Tiles: C = 2 * block + panel (0..3), A = 4 + block, B = 6 + panel,
 * where block is one of two row blocks of up to 16 activation rows and
 * panel one of two weight panels.
 */
typedef struct tile_config
{
	uint8_t		palette;
	uint8_t		start_row;
	uint8_t		reserved[14];
	uint16_t	colsb[16];
	uint8_t		rows[16];
} __attribute__((aligned(64))) tile_config;

/* Loads a configuration for row blocks of rows0 and rows1 rows (rows1 may be 0). */
AMX_TARGET static void
configure_tiles(int32_t rows0, int32_t rows1)
{
	tile_config cfg;

	memset(&cfg, 0, sizeof(cfg));
	cfg.palette = 1;
	for (int t = 0; t < 8; t++)
	{
		int32_t		rows = t == 6 || t == 7 ? PAIRS_PER_BLOCK :
			(t == 4 || t < 2) ? rows0 : rows1;

		if (rows == 0)
			continue;
		cfg.rows[t] = (uint8_t) rows;
		cfg.colsb[t] = 64;
	}
	/* the operand is the whole struct, so the compiler stores all of it first */
	__asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

/* ---------- kernel ---------- */

/*
 * The zero-padded last K block (when the pair count is not a multiple of
 * 16) of the A rows and B panels of one tile group.
 */
typedef struct tail_block
{
	int32_t		pairs;			/* pairs in the last block, 0 if none */
	uint8_t		a[2 * FM_PANEL_ROWS][64] __attribute__((aligned(64)));
	uint8_t		b[2][PAIRS_PER_BLOCK * 64] __attribute__((aligned(64)));
} tail_block;

/*
 * Stores C tile `tile` (rows activation rows by the 16 outputs of a
 * panel) into y.  The last panel, when it has only `valid` < 16 outputs,
 * goes through a buffer, so the store never writes past the matrix's
 * outputs into the next row of y.
 */
#define STORE_C(tile, rows, y, ldy, valid) \
	do { \
		if ((valid) >= FM_PANEL_ROWS) \
			_tile_stored(tile, (y), (long) (ldy) * (long) sizeof(float)); \
		else \
		{ \
			float		buf_[FM_PANEL_ROWS][FM_PANEL_ROWS]; \
			\
			_tile_stored(tile, buf_, (long) sizeof(buf_[0])); \
			MEMORY_BARRIER(); \
			for (int32_t r_ = 0; r_ < (rows); r_++) \
				memcpy((y) + (size_t) r_ * (ldy), buf_[r_], sizeof(float) * (valid)); \
		} \
	} while (0)

/*
 * Loads C tile `tile` from the partial sums STORE_C left in y.  fp32
 * values go through memory unchanged, so stopping and resuming the sum
 * between K blocks gives the same bits as one pass.
 */
#define LOAD_C(tile, rows, y, ldy, valid) \
	do { \
		if ((valid) >= FM_PANEL_ROWS) \
			_tile_loadd(tile, (y), (long) (ldy) * (long) sizeof(float)); \
		else \
		{ \
			float		buf_[FM_PANEL_ROWS][FM_PANEL_ROWS]; \
			\
			memset(buf_, 0, sizeof(buf_)); \
			for (int32_t r_ = 0; r_ < (rows); r_++) \
				memcpy(buf_[r_], (y) + (size_t) r_ * (ldy), sizeof(float) * (valid)); \
			MEMORY_BARRIER(); \
			_tile_loadd(tile, buf_, (long) sizeof(buf_[0])); \
		} \
	} while (0)

/*
 * Adds K blocks [kb0, kb1) of activation rows [r0, r0 + rows0 + rows1)
 * against panels p and, when np is 2, p + 1, to the sums in y, or to zero
 * when kb0 is 0.  Then it adds the short last block when tail is not
 * NULL.  The tiles must be configured for rows0 and rows1.  nb (row
 * blocks, 1 or 2) and np are constants at every call, so the branches on
 * them fold away.
 */
AMX_TARGET static INLINE void
tile_group(const fm_mm_job *job, int32_t p, int32_t r0, int32_t rows0, int32_t rows1,
		   size_t kb0, size_t kb1, tail_block *tail, const int nb, const int np)
{
	const fm_matrix *w = job->w;
	size_t		kp = ((size_t) w->cols + 1) / 2;
	long		stride = (long) job->xq_stride;
	const uint8_t *a0 = job->xq + (size_t) r0 * job->xq_stride;
	const uint8_t *a1 = a0 + (size_t) rows0 * job->xq_stride;
	const uint8_t *b0 = (const uint8_t *) w->data + (size_t) p * kp * 64;
	const uint8_t *b1 = b0 + kp * 64;
	float	   *y0 = job->y + (size_t) r0 * job->ldy + (size_t) p * FM_PANEL_ROWS;
	float	   *y1 = y0 + (size_t) rows0 * job->ldy;
	int32_t		valid0 = w->rows - p * FM_PANEL_ROWS;
	int32_t		valid1 = valid0 - FM_PANEL_ROWS;

	if (kb0 == 0)
	{
		_tile_zero(0);
		if (np > 1)
			_tile_zero(1);
		if (nb > 1)
		{
			_tile_zero(2);
			if (np > 1)
				_tile_zero(3);
		}
	}
	else
	{
		MEMORY_BARRIER();
		LOAD_C(0, rows0, y0, job->ldy, valid0);
		if (np > 1)
			LOAD_C(1, rows0, y0 + FM_PANEL_ROWS, job->ldy, valid1);
		if (nb > 1)
		{
			LOAD_C(2, rows1, y1, job->ldy, valid0);
			if (np > 1)
				LOAD_C(3, rows1, y1 + FM_PANEL_ROWS, job->ldy, valid1);
		}
	}

	for (size_t kb = kb0; kb < kb1; kb++)
	{
		_tile_loadd(4, a0 + kb * 64, stride);
		_tile_loadd(6, b0 + kb * 1024, 64);
		_tile_dpbf16ps(0, 4, 6);
		if (np > 1)
		{
			_tile_loadd(7, b1 + kb * 1024, 64);
			_tile_dpbf16ps(1, 4, 7);
		}
		if (nb > 1)
		{
			_tile_loadd(5, a1 + kb * 64, stride);
			_tile_dpbf16ps(2, 5, 6);
			if (np > 1)
				_tile_dpbf16ps(3, 5, 7);
		}
	}

	if (tail != NULL && tail->pairs > 0)
	{
		size_t		offset = kb1 * 64;
		size_t		bytes = (size_t) tail->pairs * 4;

		/* padding pairs are zero in both operands, so they add +0 */
		memset(tail->a, 0, sizeof(tail->a));
		for (int32_t r = 0; r < rows0 + rows1; r++)
			memcpy(tail->a[r], a0 + (size_t) r * job->xq_stride + offset, bytes);
		MEMORY_BARRIER();
		_tile_loadd(4, tail->a[0], 64);
		_tile_loadd(6, tail->b[0], 64);
		_tile_dpbf16ps(0, 4, 6);
		if (np > 1)
		{
			_tile_loadd(7, tail->b[1], 64);
			_tile_dpbf16ps(1, 4, 7);
		}
		if (nb > 1)
		{
			_tile_loadd(5, tail->a[rows0], 64);
			_tile_dpbf16ps(2, 5, 6);
			if (np > 1)
				_tile_dpbf16ps(3, 5, 7);
		}
	}

	STORE_C(0, rows0, y0, job->ldy, valid0);
	if (np > 1)
		STORE_C(1, rows0, y0 + FM_PANEL_ROWS, job->ldy, valid1);
	if (nb > 1)
	{
		STORE_C(2, rows1, y1, job->ldy, valid0);
		if (np > 1)
			STORE_C(3, rows1, y1 + FM_PANEL_ROWS, job->ldy, valid1);
	}
	MEMORY_BARRIER();
}

/* Copies the last, short K block of panels p .. p + np - 1 into tail, zero-padded. */
static void
prepare_tail(const fm_mm_job *job, int32_t p, int32_t np, tail_block *tail)
{
	size_t		kp = ((size_t) job->w->cols + 1) / 2;
	size_t		blocks = kp / PAIRS_PER_BLOCK;

	tail->pairs = (int32_t) (kp - blocks * PAIRS_PER_BLOCK);
	if (tail->pairs == 0)
		return;
	memset(tail->b, 0, sizeof(tail->b));
	for (int32_t j = 0; j < np; j++)
		memcpy(tail->b[j],
			   (const uint8_t *) job->w->data + ((size_t) (p + j) * kp + blocks * PAIRS_PER_BLOCK) * 64,
			   (size_t) tail->pairs * 64);
}

/*
 * K goes in chunks whose activations fit in the L2 cache (a_chunk_bytes).
 * Within a chunk, panels go in pairs, each pair over every group of up
 * to 32 activation rows, so a pair's weights come from memory once and
 * from cache for the other row groups.  The tiles are configured again
 * only when a row group's shape changes (at most twice per panel pair),
 * and released at the end, so an idle thread carries no tile state
 * through context switches.
 */
AMX_TARGET void
fm_bf16_panels_amx(const fm_mm_job *job, int32_t begin, int32_t end)
{
	size_t		kp = ((size_t) job->w->cols + 1) / 2;
	size_t		blocks = kp / PAIRS_PER_BLOCK;
	size_t		chunk = a_chunk_bytes / ((size_t) job->rows * 64);
	tail_block	tail;
	int32_t		configured0 = -1;
	int32_t		configured1 = -1;

	if (chunk < 1)
		chunk = 1;
	for (size_t kb0 = 0; kb0 == 0 || kb0 < blocks; kb0 += chunk)
	{
		size_t		kb1 = blocks - kb0 < chunk ? blocks : kb0 + chunk;
		bool		last = kb1 == blocks;

		for (int32_t p = begin; p < end; p += 2)
		{
			int32_t		np = end - p >= 2 ? 2 : 1;
			tail_block *t = last ? &tail : NULL;

			if (last)
				prepare_tail(job, p, np, &tail);
			for (int32_t r0 = 0; r0 < job->rows; r0 += 2 * FM_PANEL_ROWS)
			{
				int32_t		left = job->rows - r0;
				int32_t		rows0 = left < FM_PANEL_ROWS ? left : FM_PANEL_ROWS;
				int32_t		rows1 = left - rows0 < FM_PANEL_ROWS ? left - rows0 : FM_PANEL_ROWS;

				if (rows0 != configured0 || rows1 != configured1)
				{
					configure_tiles(rows0, rows1);
					configured0 = rows0;
					configured1 = rows1;
				}
				if (rows1 > 0 && np > 1)
					tile_group(job, p, r0, rows0, rows1, kb0, kb1, t, 2, 2);
				else if (rows1 > 0)
					tile_group(job, p, r0, rows0, rows1, kb0, kb1, t, 2, 1);
				else if (np > 1)
					tile_group(job, p, r0, rows0, 0, kb0, kb1, t, 1, 2);
				else
					tile_group(job, p, r0, rows0, 0, kb0, kb1, t, 1, 1);
			}
		}
	}
	if (configured0 >= 0)
		_tile_release();
}

#endif							/* __x86_64__ */
