// Classroom-style demo server: one client, DataInputStream, println of each value.
// Usage: java Server PORT
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.net.ServerSocket;
import java.net.Socket;

public class Server {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        try (ServerSocket listener = new ServerSocket(port);
             Socket socket = listener.accept()) {
            DataInputStream in = new DataInputStream(socket.getInputStream());
            DataOutputStream out = new DataOutputStream(socket.getOutputStream());
            System.out.println(in.readInt());
            System.out.println(in.readDouble());
            byte[] text = new byte[4];
            in.readFully(text);
            System.out.println(new String(text));
            out.write("HOLA".getBytes());
            out.flush();
            for (int i = 0; i < 5; i++) {
                System.out.println(in.readDouble());
            }
        }
    }
}
