/*
 * libFuzzer target for fm_st_parse_header: the input is a whole
 * safetensors file, split as a reader does (8-byte little-endian length,
 * then that many header bytes).  Every input must return FM_OK or an
 * error, without a crash, a leak or an out-of-range read; accepted
 * tensors must lie inside the file.
 */
#include "postgres_fe.h"

#include "reader/reader.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t	header_len = 0;
	char	   *header;
	fm_st_file	file;
	fm_error	err = {0};

	if (size < 8)
		return 0;
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | data[i];
	if (header_len > size - 8)
		return 0;				/* the importer rejects this before parsing */

	/* A copy of exactly header_len bytes, so ASan sees any read past it. */
	header = malloc(header_len + 1);
	memcpy(header, data + 8, header_len);
	header[header_len] = '\0';
	if (fm_st_parse_header(header, header_len, size, &file, &err) == FM_OK)
	{
		for (int32_t i = 0; i < file.num_tensors; i++)
			if (file.tensors[i].end > size || file.tensors[i].begin > file.tensors[i].end ||
				file.tensors[i].begin < file.data_start)
				abort();
		fm_st_free(&file);
	}
	free(header);
	return 0;
}
