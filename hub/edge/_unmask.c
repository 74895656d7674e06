/* WebSocket payload unmasking in C: what wsproto's XorMaskerSimple does with four bytes.translate calls a frame.
 *
 * unmask(data, key, offset) -> bytearray: `data` XORed with the 4-byte masking `key`, starting at key byte `offset`
 * (a payload read in pieces continues where the last piece stopped). hub/edge/_wire.py puts it under wsproto.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *unmask(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "unmask(data, key, offset)");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    Py_buffer data, key;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *out = NULL;
    if (key.len != 4 || offset < 0) {
        PyErr_SetString(PyExc_ValueError, "the key is 4 bytes and the offset not negative");
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, data.len);
    if (out == NULL) goto done;
    const unsigned char *in = data.buf, *k = key.buf;
    unsigned char *o = (unsigned char *)PyByteArray_AS_STRING(out);
    unsigned char rot[8];
    for (int i = 0; i < 8; i++) rot[i] = k[(offset + i) % 4];
    uint64_t k8;
    memcpy(&k8, rot, 8);
    Py_ssize_t i = 0;
    for (; i + 8 <= data.len; i += 8) {
        uint64_t w;
        memcpy(&w, in + i, 8);
        w ^= k8;
        memcpy(o + i, &w, 8);
    }
    for (; i < data.len; i++) o[i] = in[i] ^ rot[i % 8];
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return out;
}

static PyMethodDef methods[] = {
    {"unmask", (PyCFunction)(void (*)(void))unmask, METH_FASTCALL,
     "unmask(data, key, offset) -> bytearray: data XORed with the 4-byte key from key byte `offset` on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_unmask", "WebSocket payload unmasking, in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__unmask(void) { return PyModule_Create(&module); }
