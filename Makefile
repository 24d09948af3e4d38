# flexmore: PGXS build of the extension, plus engine-only targets that
# need no server (engine unit tests, the command-line driver).

EXTENSION = flexmore
MODULE_big = flexmore
EXTVERSION = 0.2.0

ENGINE_SRCS = $(wildcard src/engine/*.c)
READER_SRCS = $(wildcard src/reader/*.c)
GLUE_SRCS = $(wildcard src/*.c)
OBJS = $(ENGINE_SRCS:.c=.o) $(READER_SRCS:.c=.o) $(GLUE_SRCS:.c=.o)

DATA = $(wildcard sql/flexmore--*.sql)
REGRESS = $(patsubst sql/%.sql,%,$(filter-out sql/flexmore--%,$(sort $(wildcard sql/*.sql))))
REGRESS_OPTS = --inputdir=. --load-extension=flexmore

DEPS_CFLAGS := $(shell pkg-config --cflags openblas libzstd libpcre2-8)
DEPS_LIBS := $(shell pkg-config --libs openblas libzstd libpcre2-8)

PG_CPPFLAGS = -I$(srcdir)/src $(DEPS_CFLAGS)
PG_CFLAGS = -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
SHLIB_LINK = $(DEPS_LIBS) -lm

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# The bundled default model goes to SHAREDIR/flexmore/models/default, where
# flexmore_import (which reads server files) can find it.
MODEL_FILES = $(wildcard models/default/*)
install: install-models
install-models:
	$(MKDIR_P) '$(DESTDIR)$(datadir)/flexmore/models/default'
	$(if $(MODEL_FILES),$(INSTALL_DATA) $(MODEL_FILES) '$(DESTDIR)$(datadir)/flexmore/models/default/')
.PHONY: install-models

# ---------- engine and tools, built without the server ----------

PG_INCLUDEDIR_SERVER := $(shell $(PG_CONFIG) --includedir-server)
PG_PKGLIBDIR_STATIC := $(shell $(PG_CONFIG) --libdir) $(shell $(PG_CONFIG) --pkglibdir)
TOOL_CC = $(CC)
TOOL_CFLAGS = -std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter \
	-Wno-missing-field-initializers -Isrc $(DEPS_CFLAGS)
FE_CFLAGS = $(TOOL_CFLAGS) -DFRONTEND -I$(PG_INCLUDEDIR_SERVER)
FE_LIBS = $(addprefix -L,$(PG_PKGLIBDIR_STATIC)) -lpgcommon -lpgport $(DEPS_LIBS) -lm -lpthread

BUILD = build
ENGINE_OBJS = $(patsubst src/%.c,$(BUILD)/%.o,$(ENGINE_SRCS))
READER_OBJS = $(patsubst src/%.c,$(BUILD)/%.o,$(READER_SRCS))

$(BUILD)/engine/%.o: src/engine/%.c src/engine/*.h
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(TOOL_CFLAGS) -c -o $@ $<

$(BUILD)/reader/%.o: src/reader/%.c src/reader/*.h src/engine/*.h
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -c -o $@ $<

$(BUILD)/libfmengine.a: $(ENGINE_OBJS) $(READER_OBJS)
	rm -f $@
	ar rcs $@ $^

ENGINE_TESTS = $(patsubst test/engine/%.c,$(BUILD)/test/%,$(wildcard test/engine/test_*.c))
TOOLS = $(patsubst tools/%.c,$(BUILD)/tools/%,$(wildcard tools/*.c))

$(BUILD)/test/%: test/engine/%.c test/engine/*.h $(BUILD)/libfmengine.a
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -Itest/engine -o $@ $< $(BUILD)/libfmengine.a $(FE_LIBS)

$(BUILD)/tools/%: tools/%.c $(BUILD)/libfmengine.a
	@mkdir -p $(dir $@)
	$(TOOL_CC) $(FE_CFLAGS) -o $@ $< $(BUILD)/libfmengine.a $(FE_LIBS)

.PHONY: engine tools engine-check
engine: $(BUILD)/libfmengine.a
tools: $(TOOLS)

# Runs every engine unit test; each prints "N passed, N failed".
engine-check: $(ENGINE_TESTS) $(TOOLS)
	@set -e; for t in $(ENGINE_TESTS); do echo "== $$t"; $$t; done

clean: clean-build
clean-build:
	rm -rf $(BUILD)
