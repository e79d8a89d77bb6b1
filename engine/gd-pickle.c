/* Restricted unpickler.  Opcode numbers and meanings follow Python's pickle protocol
 * (Lib/pickletools.py documents each one); only those a torch.save state_dict uses are
 * accepted.  Every value lives in the context's arena, so shared (memoised) and even
 * cyclic references need no ownership tracking. */
#include "gd-pickle.h"
#include "gd-error.h"

#include <string.h>

/* A state_dict needs about 15 values per tensor; this allows 250 000 tensors while keeping
 * a hostile pickle from using gigabytes. */
#define MAX_VALUES (1 << 22)
#define MAX_MARKS (1 << 16)
#define MAX_GLOBAL_NAME 256
#define MAX_KEY_LENGTH 128

struct GdPickle {
  char *origin;
  GPtrArray *arena;      /* every GdPickleValue */
  GPtrArray *storages;   /* GdPickleStorage* */
  GHashTable *storage_by_key;
};

typedef struct {
  GdPickle *pickle;
  const guint8 *data;
  size_t size, pos, op_pos;
  GPtrArray *stack;
  GArray *marks;
  GHashTable *memo;      /* guint -> GdPickleValue* */
  GError **error;
} Reader;

static void
value_free (gpointer data)
{
  GdPickleValue *v = data;
  g_free (v->string);
  if (v->items)
    g_ptr_array_unref (v->items);
  g_free (v);
}

static void
storage_free (gpointer data)
{
  GdPickleStorage *s = data;
  g_free (s->key);
  g_free (s);
}

GdPickle *
gd_pickle_new (const char *origin)
{
  GdPickle *p = g_new0 (GdPickle, 1);
  p->origin = g_strdup (origin);
  p->arena = g_ptr_array_new_with_free_func (value_free);
  p->storages = g_ptr_array_new_with_free_func (storage_free);
  p->storage_by_key = g_hash_table_new (g_str_hash, g_str_equal);
  return p;
}

void
gd_pickle_free (GdPickle *p)
{
  if (!p)
    return;
  g_hash_table_unref (p->storage_by_key);
  g_ptr_array_unref (p->storages);
  g_ptr_array_unref (p->arena);
  g_free (p->origin);
  g_free (p);
}

guint gd_pickle_n_storages (const GdPickle *p) { return p->storages->len; }
const GdPickleStorage *gd_pickle_storage (const GdPickle *p, guint i) { return p->storages->pdata[i]; }

int
gd_pickle_find_storage (const GdPickle *p, const char *key)
{
  gpointer index;
  if (!g_hash_table_lookup_extended (p->storage_by_key, key, NULL, &index))
    return -1;
  return GPOINTER_TO_INT (index);
}

const char *
gd_pickle_kind_name (GdPickleKind kind)
{
  static const char *names[] = {
    "None", "bool", "int", "int", "float", "str", "bytes", "tuple", "list", "dict",
    "global", "storage", "tensor",
  };
  return kind < G_N_ELEMENTS (names) ? names[kind] : "?";
}

static gboolean
fail (Reader *r, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static gboolean
fail (Reader *r, const char *fmt, ...)
{
  if (r->error && *r->error)
    return FALSE;
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (r->error, GD_ERROR, GD_ERROR_FORMAT, "%s: pickle, byte %zu: %s",
               r->pickle->origin, r->op_pos, msg);
  g_free (msg);
  return FALSE;
}

static GdPickleValue *
value_new (Reader *r, GdPickleKind kind)
{
  if (r->pickle->arena->len >= MAX_VALUES)
    {
      fail (r, "more than %d values: too large for a state_dict", MAX_VALUES);
      return NULL;
    }
  GdPickleValue *v = g_new0 (GdPickleValue, 1);
  v->kind = kind;
  g_ptr_array_add (r->pickle->arena, v);
  return v;
}

static gboolean
push (Reader *r, GdPickleValue *v)
{
  if (!v)
    return FALSE;
  g_ptr_array_add (r->stack, v);
  return TRUE;
}

/* The top of the stack; values below the last MARK belong to an enclosing frame. */
static GdPickleValue *
top (Reader *r)
{
  guint floor = r->marks->len ? g_array_index (r->marks, guint, r->marks->len - 1) : 0;
  if (r->stack->len <= floor)
    {
      fail (r, "stack underflow");
      return NULL;
    }
  return r->stack->pdata[r->stack->len - 1];
}

static GdPickleValue *
pop (Reader *r)
{
  GdPickleValue *v = top (r);
  if (v)
    g_ptr_array_set_size (r->stack, r->stack->len - 1);
  return v;
}

/* The values pushed since the last MARK, removed from the stack (with the mark). */
static GPtrArray *
pop_to_mark (Reader *r)
{
  if (!r->marks->len)
    {
      fail (r, "no MARK to pop to");
      return NULL;
    }
  guint mark = g_array_index (r->marks, guint, r->marks->len - 1);
  g_array_set_size (r->marks, r->marks->len - 1);
  GPtrArray *items = g_ptr_array_sized_new (r->stack->len - mark);
  for (guint i = mark; i < r->stack->len; i++)
    g_ptr_array_add (items, r->stack->pdata[i]);
  g_ptr_array_set_size (r->stack, mark);
  return items;
}

static const guint8 *
take (Reader *r, size_t n)
{
  if (n > r->size - r->pos)
    {
      fail (r, "truncated (needs %zu more bytes, %zu left)", n, r->size - r->pos);
      return NULL;
    }
  const guint8 *p = r->data + r->pos;
  r->pos += n;
  return p;
}

static gboolean
read_uint (Reader *r, int bytes, uint64_t *out)
{
  const guint8 *p = take (r, (size_t) bytes);
  if (!p)
    return FALSE;
  *out = 0;
  for (int i = bytes - 1; i >= 0; i--)
    *out = (*out << 8) | p[i];
  return TRUE;
}

static GdPickleValue *
int_value (Reader *r, int64_t value)
{
  GdPickleValue *v = value_new (r, GD_PICKLE_INT);
  if (v)
    v->integer = value;
  return v;
}

/* BINUNICODE and friends: UTF-8 text; keys become C strings, so NUL is refused. */
static gboolean
read_string (Reader *r, int length_bytes)
{
  uint64_t length;
  if (!read_uint (r, length_bytes, &length))
    return FALSE;
  if (length > r->size - r->pos)
    return fail (r, "string of %" G_GUINT64_FORMAT " bytes runs past the end", length);
  const char *text = (const char *) take (r, length);
  if (!g_utf8_validate_len (text, length, NULL) || memchr (text, '\0', length))
    return fail (r, "string is not valid UTF-8 text");
  GdPickleValue *v = value_new (r, GD_PICKLE_STRING);
  if (!v)
    return FALSE;
  v->string = g_strndup (text, length);
  v->length = length;
  return push (r, v);
}

static gboolean
read_line (Reader *r, char *out)
{
  size_t limit = MIN (r->size - r->pos, (size_t) MAX_GLOBAL_NAME);
  const guint8 *start = r->data + r->pos;
  const guint8 *nl = memchr (start, '\n', limit);
  if (!nl)
    return fail (r, "GLOBAL name is not a line of at most %d bytes", MAX_GLOBAL_NAME - 1);
  size_t len = (size_t) (nl - start);
  memcpy (out, start, len);
  out[len] = '\0';
  r->pos += len + 1;
  return TRUE;
}

static const struct {
  const char *name;
  GdDtype dtype;
} storage_types[] = {
  { "FloatStorage", GD_DTYPE_F32 },
  { "HalfStorage", GD_DTYPE_F16 },
  { "BFloat16Storage", GD_DTYPE_BF16 },
  { "DoubleStorage", GD_DTYPE_F64 },
  { "LongStorage", GD_DTYPE_I64 },
};

/* The allow-list.  Storage types are also accepted from torch.cuda, where checkpoints
 * saved from a GPU by older PyTorch versions name them. */
static gboolean
resolve_global (Reader *r, const char *module, const char *name)
{
  GdPickleValue *v = value_new (r, GD_PICKLE_GLOBAL);
  if (!v)
    return FALSE;
  if (strcmp (module, "collections") == 0 && strcmp (name, "OrderedDict") == 0)
    v->integer = GD_GLOBAL_ORDERED_DICT;
  else if (strcmp (module, "torch._utils") == 0 && strcmp (name, "_rebuild_tensor_v2") == 0)
    v->integer = GD_GLOBAL_REBUILD_TENSOR_V2;
  else if (strcmp (module, "torch._utils") == 0 && strcmp (name, "_rebuild_parameter") == 0)
    v->integer = GD_GLOBAL_REBUILD_PARAMETER;
  else
    {
      gboolean found = FALSE;
      if (strcmp (module, "torch") == 0 || strcmp (module, "torch.cuda") == 0)
        for (guint i = 0; i < G_N_ELEMENTS (storage_types) && !found; i++)
          if (strcmp (name, storage_types[i].name) == 0)
            {
              v->integer = GD_GLOBAL_STORAGE_TYPE;
              v->dtype = storage_types[i].dtype;
              found = TRUE;
            }
      if (!found)
        {
          char *m = g_strescape (module, NULL), *n = g_strescape (name, NULL);
          fail (r, "refused global '%s.%s': a checkpoint of weights needs only "
                "collections.OrderedDict, torch._utils._rebuild_tensor_v2, "
                "torch._utils._rebuild_parameter and torch storage types, and loading "
                "anything else could run code", m, n);
          g_free (m);
          g_free (n);
          return FALSE;
        }
    }
  return push (r, v);
}

static gboolean
valid_key (const char *key)
{
  size_t len = strlen (key);
  if (len == 0 || len > MAX_KEY_LENGTH)
    return FALSE;
  for (size_t i = 0; i < len; i++)
    if (!g_ascii_isalnum (key[i]) && key[i] != '_' && key[i] != '-' && key[i] != '.')
      return FALSE;
  return strcmp (key, ".") != 0 && strcmp (key, "..") != 0;
}

static gboolean
is_int (const GdPickleValue *v)
{
  return v->kind == GD_PICKLE_INT || v->kind == GD_PICKLE_BOOL;
}

/* Largest element count a storage may declare: its bytes must fit in int64. */
#define MAX_STORAGE_NUMEL (INT64_MAX / 8)

static int
register_storage (Reader *r, const char *key, GdDtype dtype, int64_t numel, int root,
                  int64_t root_offset)
{
  GdPickle *p = r->pickle;
  int index = gd_pickle_find_storage (p, key);
  if (index >= 0)
    {
      const GdPickleStorage *s = p->storages->pdata[index];
      if (s->dtype != dtype || s->numel != numel || s->root != root
          || s->root_offset != root_offset)
        {
          fail (r, "storage '%s' is declared twice, differently", key);
          return -1;
        }
      return index;
    }
  GdPickleStorage *s = g_new0 (GdPickleStorage, 1);
  s->key = g_strdup (key);
  s->dtype = dtype;
  s->numel = numel;
  s->root = root;
  s->root_offset = root_offset;
  index = (int) p->storages->len;
  g_ptr_array_add (p->storages, s);
  g_hash_table_insert (p->storage_by_key, s->key, GINT_TO_POINTER (index));
  return index;
}

/* BINPERSID: PyTorch's persistent_load, without loading anything yet. */
static gboolean
persistent_load (Reader *r, GdPickleValue *pid)
{
  if (pid->kind != GD_PICKLE_TUPLE || (pid->items->len != 5 && pid->items->len != 6))
    return fail (r, "persistent id is a %s, not a storage reference tuple",
                 gd_pickle_kind_name (pid->kind));
  GdPickleValue **item = (GdPickleValue **) pid->items->pdata;
  if (item[0]->kind != GD_PICKLE_STRING || strcmp (item[0]->string, "storage") != 0)
    return fail (r, "persistent id is not a ('storage', ...) reference");
  if (item[1]->kind != GD_PICKLE_GLOBAL || item[1]->integer != GD_GLOBAL_STORAGE_TYPE)
    return fail (r, "storage reference without a storage type");
  if (item[2]->kind != GD_PICKLE_STRING || !valid_key (item[2]->string))
    return fail (r, "storage key is not a short name of letters, digits, '_', '-' or '.'");
  if (item[3]->kind != GD_PICKLE_STRING)
    return fail (r, "storage location is not a string");
  if (!is_int (item[4]) || item[4]->integer < 0 || item[4]->integer > MAX_STORAGE_NUMEL)
    return fail (r, "storage '%s' has an invalid element count", item[2]->string);
  GdDtype dtype = item[1]->dtype;
  int index = register_storage (r, item[2]->string, dtype, item[4]->integer, -1, 0);
  if (index < 0)
    return FALSE;
  if (pid->items->len == 6 && item[5]->kind != GD_PICKLE_NONE)
    {
      /* legacy view_metadata: (view_key, offset, numel) within the root storage */
      GdPickleValue *view = item[5];
      GdPickleValue **vi = view->kind == GD_PICKLE_TUPLE && view->items->len == 3
                           ? (GdPickleValue **) view->items->pdata : NULL;
      if (!vi || vi[0]->kind != GD_PICKLE_STRING || !valid_key (vi[0]->string)
          || !is_int (vi[1]) || !is_int (vi[2]) || vi[1]->integer < 0 || vi[2]->integer < 0
          || vi[1]->integer > item[4]->integer
          || vi[2]->integer > item[4]->integer - vi[1]->integer)
        return fail (r, "storage view of '%s' is malformed or outside it", item[2]->string);
      if (strcmp (vi[0]->string, item[2]->string) == 0)
        return fail (r, "storage view '%s' names its own root", vi[0]->string);
      index = register_storage (r, vi[0]->string, dtype, vi[2]->integer, index, vi[1]->integer);
      if (index < 0)
        return FALSE;
    }
  GdPickleValue *v = value_new (r, GD_PICKLE_STORAGE);
  if (!v)
    return FALSE;
  v->dtype = dtype;
  v->storage = index;
  return push (r, v);
}

static gboolean
int_tuple (const GdPickleValue *v, int64_t *out, int max, int *count)
{
  if (v->kind != GD_PICKLE_TUPLE || (int) v->items->len > max)
    return FALSE;
  for (guint i = 0; i < v->items->len; i++)
    {
      const GdPickleValue *e = v->items->pdata[i];
      if (!is_int (e) || e->integer < 0)
        return FALSE;
      out[i] = e->integer;
    }
  *count = (int) v->items->len;
  return TRUE;
}

/* _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
 * [, metadata]): a strided view of the storage, which must lie inside it. */
static gboolean
rebuild_tensor (Reader *r, GdPickleValue *args)
{
  if (args->items->len != 6 && args->items->len != 7)
    return fail (r, "_rebuild_tensor_v2 takes 6 or 7 arguments, not %u", args->items->len);
  GdPickleValue **a = (GdPickleValue **) args->items->pdata;
  if (a[0]->kind != GD_PICKLE_STORAGE)
    return fail (r, "_rebuild_tensor_v2 called on a %s, not a storage", gd_pickle_kind_name (a[0]->kind));
  GdPickleValue *t = value_new (r, GD_PICKLE_TENSOR);
  if (!t)
    return FALSE;
  int nstride = 0;
  if (!is_int (a[1]) || a[1]->integer < 0)
    return fail (r, "tensor storage offset is not a non-negative integer");
  if (!int_tuple (a[2], t->shape, GD_MAX_DIMS, &t->ndim)
      || !int_tuple (a[3], t->stride, GD_MAX_DIMS, &nstride) || nstride != t->ndim)
    return fail (r, "tensor size and stride are not two tuples of the same length "
                 "(at most %d non-negative integers)", GD_MAX_DIMS);
  if (a[4]->kind != GD_PICKLE_BOOL)
    return fail (r, "tensor requires_grad is not a bool");
  if (args->items->len == 7 && a[6]->kind != GD_PICKLE_NONE && a[6]->kind != GD_PICKLE_DICT)
    return fail (r, "tensor metadata is a %s", gd_pickle_kind_name (a[6]->kind));
  const GdPickleStorage *s = r->pickle->storages->pdata[a[0]->storage];
  t->dtype = s->dtype;
  t->storage = a[0]->storage;
  t->offset = a[1]->integer;
  int64_t numel = 1, last = t->offset;
  gboolean overflow = FALSE;
  for (int d = 0; d < t->ndim; d++)
    {
      overflow |= __builtin_mul_overflow (numel, t->shape[d], &numel);
      int64_t reach;
      if (t->shape[d] > 0)
        {
          overflow |= __builtin_mul_overflow (t->shape[d] - 1, t->stride[d], &reach);
          overflow |= __builtin_add_overflow (last, reach, &last);
        }
    }
  if (overflow)
    return fail (r, "tensor size or stride overflows");
  t->numel = numel;
  if (numel > 0 && last >= s->numel)
    return fail (r, "tensor view reaches element %" G_GINT64_FORMAT " of storage '%s', "
                 "which has %" G_GINT64_FORMAT, last, s->key, s->numel);
  return push (r, t);
}

static gboolean
reduce (Reader *r)
{
  GdPickleValue *args = pop (r), *callable = args ? pop (r) : NULL;
  if (!callable)
    return FALSE;
  if (callable->kind != GD_PICKLE_GLOBAL)
    return fail (r, "REDUCE calls a %s", gd_pickle_kind_name (callable->kind));
  if (args->kind != GD_PICKLE_TUPLE)
    return fail (r, "REDUCE arguments are a %s, not a tuple", gd_pickle_kind_name (args->kind));
  switch ((GdPickleGlobal) callable->integer)
    {
    case GD_GLOBAL_ORDERED_DICT:
      if (args->items->len != 0)
        return fail (r, "OrderedDict is only created empty");
      GdPickleValue *dict = value_new (r, GD_PICKLE_DICT);
      if (!dict)
        return FALSE;
      dict->items = g_ptr_array_new ();
      return push (r, dict);
    case GD_GLOBAL_REBUILD_TENSOR_V2:
      return rebuild_tensor (r, args);
    case GD_GLOBAL_REBUILD_PARAMETER:
      /* _rebuild_parameter(data, requires_grad, backward_hooks): the tensor itself */
      if (args->items->len != 3 || ((GdPickleValue *) args->items->pdata[0])->kind != GD_PICKLE_TENSOR)
        return fail (r, "_rebuild_parameter takes (tensor, requires_grad, hooks)");
      return push (r, args->items->pdata[0]);
    case GD_GLOBAL_STORAGE_TYPE:
      return fail (r, "a storage type is called; storages come only from persistent ids");
    }
  return fail (r, "REDUCE on an unknown global");
}

static gboolean
make_sequence (Reader *r, GdPickleKind kind, GPtrArray *items)
{
  GdPickleValue *v = value_new (r, kind);
  if (!v)
    {
      g_ptr_array_unref (items);
      return FALSE;
    }
  v->items = items;
  return push (r, v);
}

static gboolean
tuple_n (Reader *r, guint n)
{
  GPtrArray *items = g_ptr_array_sized_new (n);
  g_ptr_array_set_size (items, n);
  for (guint i = n; i-- > 0;)
    {
      GdPickleValue *v = pop (r);
      if (!v)
        {
          g_ptr_array_unref (items);
          return FALSE;
        }
      items->pdata[i] = v;
    }
  return make_sequence (r, GD_PICKLE_TUPLE, items);
}

static gboolean
extend (Reader *r, GdPickleKind kind, GPtrArray *items)
{
  GdPickleValue *target = items ? top (r) : NULL;
  gboolean ok = target != NULL;
  if (ok && target->kind != kind)
    ok = fail (r, "%s added to a %s", kind == GD_PICKLE_DICT ? "items" : "elements",
               gd_pickle_kind_name (target->kind));
  else if (ok && kind == GD_PICKLE_DICT && items->len % 2)
    ok = fail (r, "SETITEMS with an odd number of values");
  if (ok)
    for (guint i = 0; i < items->len; i++)
      g_ptr_array_add (target->items, items->pdata[i]);
  if (items)
    g_ptr_array_unref (items);
  return ok;
}

static GPtrArray *
pop_n (Reader *r, guint n)
{
  GPtrArray *items = g_ptr_array_sized_new (n);
  g_ptr_array_set_size (items, n);
  for (guint i = n; i-- > 0;)
    if (!(items->pdata[i] = pop (r)))
      {
        g_ptr_array_unref (items);
        return NULL;
      }
  return items;
}

static gboolean
memo_put (Reader *r, guint64 index)
{
  GdPickleValue *v = top (r);
  if (!v)
    return FALSE;
  if (index > G_MAXUINT)
    return fail (r, "memo index too large");
  g_hash_table_insert (r->memo, GUINT_TO_POINTER ((guint) index), v);
  return TRUE;
}

static gboolean
memo_get (Reader *r, guint64 index)
{
  GdPickleValue *v = index <= G_MAXUINT ? g_hash_table_lookup (r->memo, GUINT_TO_POINTER ((guint) index)) : NULL;
  if (!v)
    return fail (r, "memo entry %" G_GUINT64_FORMAT " was never stored", index);
  return push (r, v);
}

/* Names of opcodes that are valid pickle but refused here, for the error message. */
static const char *
refused_opcode_name (guint8 op)
{
  switch (op)
    {
    case 'i': return "INST (creates an object of any class)";
    case 'o': return "OBJ (creates an object of any class)";
    case 0x81: return "NEWOBJ (creates an object of any class)";
    case 0x92: return "NEWOBJ_EX (creates an object of any class)";
    case 'P': return "PERSID";
    case 0x82: case 0x83: case 0x84: return "EXT (copyreg extension)";
    case 'I': case 'L': case 'F': case 'S': case 'V': return "a text (protocol 0) value";
    case 'T': case 'U': case 'B': case 'C': case 0x8e: return "a byte string";
    case 0x8b: return "LONG4";
    case 0x8f: case 0x90: case 0x91: return "a set";
    case '0': case '1': case '2': return "a stack manipulation";
    case 'g': case 'p': case 'd': case 'l': return "a text-protocol memo or container";
    case 0x96: case 0x97: case 0x98: return "an out-of-band buffer";
    default: return NULL;
    }
}

static gboolean
step (Reader *r, guint8 op, gboolean *stop)
{
  uint64_t n;
  GdPickleValue *v;
  switch (op)
    {
    case 0x80:  /* PROTO */
      if (!read_uint (r, 1, &n))
        return FALSE;
      if (n < 2 || n > 5)
        return fail (r, "pickle protocol %" G_GUINT64_FORMAT " (2 to 5 are read)", n);
      return TRUE;
    case 0x95:  /* FRAME: a length prefix for buffering, nothing to interpret */
      return read_uint (r, 8, &n);
    case '.':   /* STOP */
      *stop = TRUE;
      return TRUE;
    case '(':   /* MARK */
      if (r->marks->len >= MAX_MARKS)
        return fail (r, "too many nested MARKs");
      g_array_append_val (r->marks, r->stack->len);
      return TRUE;
    case ')':   /* EMPTY_TUPLE */
      return make_sequence (r, GD_PICKLE_TUPLE, g_ptr_array_new ());
    case 't':   /* TUPLE */
      {
        GPtrArray *items = pop_to_mark (r);
        return items && make_sequence (r, GD_PICKLE_TUPLE, items);
      }
    case 0x85: return tuple_n (r, 1);
    case 0x86: return tuple_n (r, 2);
    case 0x87: return tuple_n (r, 3);
    case ']':   /* EMPTY_LIST */
      return make_sequence (r, GD_PICKLE_LIST, g_ptr_array_new ());
    case '}':   /* EMPTY_DICT */
      return make_sequence (r, GD_PICKLE_DICT, g_ptr_array_new ());
    case 'a':   /* APPEND */
      return extend (r, GD_PICKLE_LIST, pop_n (r, 1));
    case 'e':   /* APPENDS */
      return extend (r, GD_PICKLE_LIST, pop_to_mark (r));
    case 's':   /* SETITEM */
      return extend (r, GD_PICKLE_DICT, pop_n (r, 2));
    case 'u':   /* SETITEMS */
      return extend (r, GD_PICKLE_DICT, pop_to_mark (r));
    case 'N':
      return push (r, value_new (r, GD_PICKLE_NONE));
    case 0x88:  /* NEWTRUE */
    case 0x89:  /* NEWFALSE */
      v = value_new (r, GD_PICKLE_BOOL);
      if (v)
        v->integer = op == 0x88;
      return push (r, v);
    case 'J':   /* BININT: signed 32-bit */
      return read_uint (r, 4, &n) && push (r, int_value (r, (int32_t) (uint32_t) n));
    case 'K':   /* BININT1 */
      return read_uint (r, 1, &n) && push (r, int_value (r, (int64_t) n));
    case 'M':   /* BININT2 */
      return read_uint (r, 2, &n) && push (r, int_value (r, (int64_t) n));
    case 0x8a:  /* LONG1: little-endian two's complement of n bytes */
      {
        if (!read_uint (r, 1, &n))
          return FALSE;
        const guint8 *bytes = take (r, n);
        if (!bytes)
          return FALSE;
        if (n <= 8)
          {
            uint64_t u = 0;
            for (int i = (int) n - 1; i >= 0; i--)
              u = (u << 8) | bytes[i];
            if (n > 0 && n < 8 && (bytes[n - 1] & 0x80))
              u |= ~(uint64_t) 0 << (8 * n);
            return push (r, int_value (r, (int64_t) u));
          }
        v = value_new (r, GD_PICKLE_BIGINT);
        if (!v)
          return FALSE;
        v->string = g_memdup2 (bytes, n);
        v->length = n;
        return push (r, v);
      }
    case 'G':   /* BINFLOAT: big-endian IEEE double */
      {
        const guint8 *b = take (r, 8);
        if (!b)
          return FALSE;
        uint64_t bits = 0;
        for (int i = 0; i < 8; i++)
          bits = (bits << 8) | b[i];
        v = value_new (r, GD_PICKLE_FLOAT);
        if (v)
          memcpy (&v->real, &bits, 8);
        return push (r, v);
      }
    case 'X':   /* BINUNICODE */
      return read_string (r, 4);
    case 0x8c:  /* SHORT_BINUNICODE */
      return read_string (r, 1);
    case 0x8d:  /* BINUNICODE8 */
      return read_string (r, 8);
    case 'q':   /* BINPUT */
      return read_uint (r, 1, &n) && memo_put (r, n);
    case 'r':   /* LONG_BINPUT */
      return read_uint (r, 4, &n) && memo_put (r, n);
    case 0x94:  /* MEMOIZE */
      return memo_put (r, g_hash_table_size (r->memo));
    case 'h':   /* BINGET */
      return read_uint (r, 1, &n) && memo_get (r, n);
    case 'j':   /* LONG_BINGET */
      return read_uint (r, 4, &n) && memo_get (r, n);
    case 'c':   /* GLOBAL "module\nname\n" */
      {
        char module[MAX_GLOBAL_NAME], name[MAX_GLOBAL_NAME];
        return read_line (r, module) && read_line (r, name) && resolve_global (r, module, name);
      }
    case 0x93:  /* STACK_GLOBAL */
      {
        GdPickleValue *name = pop (r), *module = name ? pop (r) : NULL;
        if (!module)
          return FALSE;
        if (module->kind != GD_PICKLE_STRING || name->kind != GD_PICKLE_STRING)
          return fail (r, "STACK_GLOBAL needs two strings");
        return resolve_global (r, module->string, name->string);
      }
    case 'R':   /* REDUCE */
      return reduce (r);
    case 'b':   /* BUILD: object state; OrderedDict carries _metadata (module versions) */
      {
        GdPickleValue *state = pop (r), *target = state ? top (r) : NULL;
        if (!target)
          return FALSE;
        if (target->kind != GD_PICKLE_DICT && target->kind != GD_PICKLE_TENSOR)
          return fail (r, "BUILD on a %s", gd_pickle_kind_name (target->kind));
        return TRUE;
      }
    case 'Q':   /* BINPERSID */
      {
        GdPickleValue *pid = pop (r);
        return pid && persistent_load (r, pid);
      }
    default:
      {
        const char *name = refused_opcode_name (op);
        if (name)
          return fail (r, "opcode %s is not allowed in a checkpoint", name);
        return fail (r, "unknown opcode 0x%02x", op);
      }
    }
}

GdPickleValue *
gd_pickle_parse (GdPickle *pickle, const guint8 *data, size_t size, size_t *consumed,
                 GError **error)
{
  Reader r = {
    .pickle = pickle, .data = data, .size = size, .error = error,
    .stack = g_ptr_array_new (),
    .marks = g_array_new (FALSE, FALSE, sizeof (guint)),
    .memo = g_hash_table_new (g_direct_hash, g_direct_equal),
  };
  GdPickleValue *result = NULL;
  gboolean stop = FALSE, ok = TRUE;
  while (ok && !stop)
    {
      r.op_pos = r.pos;
      if (r.pos >= r.size)
        ok = fail (&r, "ends without STOP");
      else
        ok = step (&r, r.data[r.pos++], &stop);
    }
  if (ok)
    {
      r.marks->len = 0;
      result = pop (&r);
    }
  if (result && consumed)
    *consumed = r.pos;
  g_ptr_array_unref (r.stack);
  g_array_unref (r.marks);
  g_hash_table_unref (r.memo);
  return result;
}
