/* The line loop of hub/ingest/_reader.py in C: a batch of decoded telemetry points into InfluxDB line protocol.
 *
 * build(points, prefixes, field_keys, prefix_miss, key_miss, last) -> str | None
 *
 * `points` is the list of msgspec structs `TelemetryReader` decodes (attributes measurement, ts, fields, tags: the
 * tags' raw JSON text as a msgspec.Raw). `prefixes` maps (measurement, tags' bytes) to the escaped series prefix and
 * `field_keys` a field name to its escaped `key=`; on a miss `prefix_miss(measurement, tags_bytes)` or
 * `key_miss(name)` is called (the reader's checks, which fill the caches or raise). `last` is a list of three kept
 * from call to call: the last series' measurement, tags' bytes and prefix (None at first), so that a device's next
 * message on the same series makes no key at all. Values are written as `TelemetryReader._python_lines` writes
 * them: a float as repr() spells it, {"int": n} as `ni`, a plain int unsuffixed, booleans as true/false, strings
 * quoted with `\` and `"` escaped. A string holding a line break gives None (the reader then leaves the frame to
 * the reference decoder). The text is the Python loop's to the byte (tests/test_reader.py runs both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

static PyObject *s_measurement, *s_ts, *s_fields, *s_tags, *s_int;

/* Where a point type keeps its four attributes: msgspec makes them slots (member descriptors), read at their offset
 * as a slot's getter would; a type laid out otherwise (offset 0) is read with getattr. One type is remembered: a
 * reader's point type depends on its Limits only, and a hub has one set of limits. */
enum { MEASUREMENT, TS, FIELDS, TAGS, NATTRS };
static PyTypeObject *layout_type; /* owned */
static Py_ssize_t layout[NATTRS];

static void resolve_layout(PyTypeObject *tp) {
    PyObject *names[NATTRS] = {s_measurement, s_ts, s_fields, s_tags};
    for (int i = 0; i < NATTRS; i++) {
        PyObject *d = PyObject_GetAttr((PyObject *)tp, names[i]); /* on the type: the descriptor itself */
        layout[i] = 0;
        if (d == NULL) {
            PyErr_Clear(); /* read with getattr, which will say what is wrong */
            continue;
        }
        if (Py_TYPE(d) == &PyMemberDescr_Type && ((PyMemberDescrObject *)d)->d_common.d_type == tp) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            if (m->type == T_OBJECT_EX && !(m->flags & READ_RESTRICTED)) layout[i] = m->offset;
        }
        Py_DECREF(d);
    }
    Py_INCREF(tp); /* held: another type can never come to live at this address */
    Py_XSETREF(layout_type, tp);
}

/* Attribute `i` of `point` (a new reference), from its slot where the type has one. */
static PyObject *attr(PyObject *point, int i) {
    static PyObject **names[NATTRS] = {&s_measurement, &s_ts, &s_fields, &s_tags};
    if (layout[i] == 0) return PyObject_GetAttr(point, *names[i]);
    PyObject *v = *(PyObject **)((char *)point + layout[i]);
    if (v == NULL) {
        PyErr_SetObject(PyExc_AttributeError, *names[i]);
        return NULL;
    }
    Py_INCREF(v);
    return v;
}

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t more) {
    Py_ssize_t need = b->len + more;
    if (need <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < need) cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap && buf_grow(b, n) < 0) return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int buf_char(Buf *b, char c) {
    if (b->len + 1 > b->cap && buf_grow(b, 1) < 0) return -1;
    b->data[b->len++] = c;
    return 0;
}

static int buf_str(Buf *b, PyObject *s) {
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n);
    if (utf8 == NULL) return -1;
    return buf_put(b, utf8, n);
}

static int buf_int(Buf *b, PyObject *v) {
    /* A Python int as str() spells it: msgspec checked the int64 range, so it fits a long long. */
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    char tmp[24];
    char *end = tmp + sizeof tmp, *p = end;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (x < 0) *--p = '-';
    return buf_put(b, p, end - p);
}

static int buf_float(Buf *b, double x) {
    /* repr(float): the shortest text that reads back as x, as float_repr makes it. */
    char *text = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) return -1;
    int rc = buf_put(b, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return rc;
}

/* A string field value quoted, `\` and `"` escaped; 1 if it holds a line break (refused), -1 on error. */
static int buf_string(Buf *b, PyObject *s) {
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n);
    if (utf8 == NULL) return -1;
    if (buf_grow(b, 2 * n + 2) < 0) return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = utf8[i];
        if (c == '\n' || c == '\r') return 1;
        if (c == '\\' || c == '"') *out++ = '\\';
        *out++ = c;
    }
    *out++ = '"';
    b->len = out - b->data;
    return 0;
}

/* One field value; 1 if refused, -1 on error. */
static int buf_value(Buf *b, PyObject *v) {
    if (PyFloat_CheckExact(v)) return buf_float(b, PyFloat_AS_DOUBLE(v));
    if (PyDict_CheckExact(v)) {
        PyObject *n = PyDict_GetItemWithError(v, s_int);
        if (n == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "integer field without 'int'");
            return -1;
        }
        if (buf_int(b, n) < 0) return -1;
        return buf_char(b, 'i');
    }
    if (v == Py_True) return buf_put(b, "true", 4);
    if (v == Py_False) return buf_put(b, "false", 5);
    if (PyLong_CheckExact(v)) return buf_int(b, v);
    if (PyUnicode_CheckExact(v)) return buf_string(b, v);
    PyErr_Format(PyExc_TypeError, "unsupported field value of type %.100s", Py_TYPE(v)->tp_name);
    return -1;
}

/* `value` if it is a str (what a cache miss must give), else NULL with an error; steals the reference. */
static PyObject *checked_str(PyObject *value) {
    if (value != NULL && !PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "a cache miss must give a str");
        Py_CLEAR(value);
    }
    return value;
}

/* The series prefix of a point: the previous point's when measurement and tags are the same, else the cache's. */
typedef struct {
    PyObject *measurement, *tags, *prefix; /* owned; tags is bytes */
} Series;

static PyObject *series_prefix(Series *last, PyObject *measurement, Py_buffer *tags, PyObject *prefixes,
                               PyObject *prefix_miss) {
    if (last->prefix != NULL && PyBytes_GET_SIZE(last->tags) == tags->len
        && memcmp(PyBytes_AS_STRING(last->tags), tags->buf, (size_t)tags->len) == 0) {
        int same = PyObject_RichCompareBool(last->measurement, measurement, Py_EQ);
        if (same < 0) return NULL;
        if (same) return last->prefix;
    }
    PyObject *raw = PyBytes_FromStringAndSize(tags->buf, tags->len);
    if (raw == NULL) return NULL;
    PyObject *key = PyTuple_Pack(2, measurement, raw);
    if (key == NULL) {
        Py_DECREF(raw);
        return NULL;
    }
    PyObject *prefix = PyDict_GetItemWithError(prefixes, key);
    if (prefix != NULL) {
        Py_INCREF(prefix);
    } else if (!PyErr_Occurred()) {
        prefix = checked_str(PyObject_CallObject(prefix_miss, key));
    }
    Py_DECREF(key);
    if (prefix == NULL) {
        Py_DECREF(raw);
        return NULL;
    }
    Py_INCREF(measurement);
    Py_XSETREF(last->measurement, measurement);
    Py_XSETREF(last->tags, raw);
    Py_XSETREF(last->prefix, prefix);
    return prefix;
}

/* One point's line; 1 if refused, -1 on error. */
static int build_point(Buf *b, PyObject *point, Series *last, PyObject *prefixes, PyObject *field_keys,
                       PyObject *prefix_miss, PyObject *key_miss) {
    int rc = -1;
    PyObject *measurement = NULL, *tags = NULL, *fields = NULL, *ts = NULL;
    Py_buffer view = {0};
    if (Py_TYPE(point) != layout_type) resolve_layout(Py_TYPE(point));
    if ((measurement = attr(point, MEASUREMENT)) == NULL) goto done;
    if ((tags = attr(point, TAGS)) == NULL) goto done;
    if ((fields = attr(point, FIELDS)) == NULL) goto done;
    if ((ts = attr(point, TS)) == NULL) goto done;
    if (!PyDict_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "a point's fields must be a dict");
        goto done;
    }
    if (PyObject_GetBuffer(tags, &view, PyBUF_SIMPLE) < 0) goto done;
    PyObject *prefix = series_prefix(last, measurement, &view, prefixes, prefix_miss);
    if (prefix == NULL || buf_str(b, prefix) < 0 || buf_char(b, ' ') < 0) goto done;
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    int first = 1;
    while (PyDict_Next(fields, &pos, &name, &value)) {
        if (!first && buf_char(b, ',') < 0) goto done;
        first = 0;
        PyObject *key = PyDict_GetItemWithError(field_keys, name);
        if (key != NULL) {
            Py_INCREF(key);
        } else if (!PyErr_Occurred()) {
            key = checked_str(PyObject_CallOneArg(key_miss, name));
        }
        if (key == NULL) goto done;
        int ok = buf_str(b, key);
        Py_DECREF(key);
        if (ok < 0) goto done;
        int v = buf_value(b, value);
        if (v != 0) {
            rc = v;
            goto done;
        }
    }
    if (buf_char(b, ' ') < 0 || !PyLong_CheckExact(ts) || buf_int(b, ts) < 0 || buf_char(b, '\n') < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a point's ts must be an int");
        goto done;
    }
    rc = 0;
done:
    if (view.obj != NULL) PyBuffer_Release(&view);
    Py_XDECREF(measurement);
    Py_XDECREF(tags);
    Py_XDECREF(fields);
    Py_XDECREF(ts);
    return rc;
}

static PyObject *build(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "build(points, prefixes, field_keys, prefix_miss, key_miss, last)");
        return NULL;
    }
    PyObject *points = args[0], *prefixes = args[1], *field_keys = args[2], *kept = args[5];
    if (!PyList_Check(points) || !PyDict_Check(prefixes) || !PyDict_Check(field_keys) || !PyList_CheckExact(kept)
        || PyList_GET_SIZE(kept) != 3) {
        PyErr_SetString(PyExc_TypeError, "points must be a list, prefixes and field_keys dicts, last a list of 3");
        return NULL;
    }
    Buf b = {0};
    Series last = {0};
    if (PyUnicode_CheckExact(PyList_GET_ITEM(kept, 0)) && PyBytes_CheckExact(PyList_GET_ITEM(kept, 1))
        && PyUnicode_CheckExact(PyList_GET_ITEM(kept, 2))) {
        last.measurement = Py_NewRef(PyList_GET_ITEM(kept, 0));
        last.tags = Py_NewRef(PyList_GET_ITEM(kept, 1));
        last.prefix = Py_NewRef(PyList_GET_ITEM(kept, 2));
    }
    PyObject *result = NULL;
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(points) && rc == 0; i++) {
        rc = build_point(&b, PyList_GET_ITEM(points, i), &last, prefixes, field_keys, args[3], args[4]);
    }
    if (rc == 0) {
        result = PyUnicode_DecodeUTF8(b.data ? b.data : "", b.len, "strict");
    } else if (rc == 1) {
        result = Py_NewRef(Py_None);
    }
    PyMem_Free(b.data);
    if (last.prefix != NULL) { /* kept for the next call (the list takes the references) */
        PyList_SetItem(kept, 0, last.measurement);
        PyList_SetItem(kept, 1, last.tags);
        PyList_SetItem(kept, 2, last.prefix);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL,
     "build(points, prefixes, field_keys, prefix_miss, key_miss, last) -> str | None: the lines (None: refused)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastlines", "Telemetry points into InfluxDB line protocol, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastlines(void) {
    if ((s_measurement = PyUnicode_InternFromString("measurement")) == NULL) return NULL;
    if ((s_ts = PyUnicode_InternFromString("ts")) == NULL) return NULL;
    if ((s_fields = PyUnicode_InternFromString("fields")) == NULL) return NULL;
    if ((s_tags = PyUnicode_InternFromString("tags")) == NULL) return NULL;
    if ((s_int = PyUnicode_InternFromString("int")) == NULL) return NULL;
    return PyModule_Create(&module);
}
